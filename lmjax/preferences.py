"""Sampling completions of many prompts from a run, and preference pairs ranked by a reward.

`lmjax data preferences RUN_DIR --prompts FILE.jsonl --reward python_syntax --out OUT.jsonl`
samples `--samples` completions per prompt (temperature 1 by default) from the run's latest
checkpoint, scores each with a registered reward (lmjax/rewards.py) and writes, per prompt whose
best and worst completions score differently, one DPO record
`{"prompt", "chosen": best, "rejected": worst, "reward_chosen", "reward_rejected", "source"}`.

A run fine-tuned on chats (objective sft or dpo) is prompted through its chat template (user turn,
then the assistant marker; a completion ends at end-of-turn); any other decoder run continues the
raw prompt text (a completion ends at eos). Prompts of different lengths are sampled together,
left-padded to a multiple of `LENGTH_BUCKET` tokens so that few shapes compile.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lmjax.data.chat import ChatTemplate
from lmjax.data.examples import read_records, string_field
from lmjax.data.tokenizer import Tokenizer, load_tokenizer
from lmjax.errors import UserError
from lmjax.evaluate import LoadedRun, load_run
from lmjax.fileio import write_text_atomic
from lmjax.generate import GenerateError, generate
from lmjax.models import model_family
from lmjax.rewards import get_reward

LENGTH_BUCKET = 32
CHAT_OBJECTIVES = ("sft", "dpo")


def read_prompts(path: Path, key: str = "prompt") -> list[tuple[str, str]]:
    """(source `file:LINE`, prompt) of every record of a JSONL file."""
    expected = f"a JSON object with a string field '{key}' (--prompt-key)"
    return [(f"{path.name}:{line}", string_field(record, key, "--prompt-key", where, expected))
            for where, line, record in read_records(path, "preferences", expected)]


@dataclass(frozen=True)
class Completion:
    text: str  # up to the stop token
    ids: tuple[int, ...]  # the sampled tokens, the stop token included when it was reached


@dataclass
class Sampler:
    """A run loaded on one device, with how it is prompted."""

    run: LoadedRun
    tokenizer: Tokenizer
    template: ChatTemplate | None  # None: the raw prompt is continued

    @classmethod
    def load(cls, run_dir: Path) -> Sampler:
        tokenizer_path = run_dir / "tokenizer.model"
        if not tokenizer_path.exists():
            raise UserError(f"{run_dir} has no tokenizer.model; expected a run directory written by `lmjax train`")
        single_device = [f"mesh.{axis}=1" for axis in ("data", "fsdp", "tensor", "expert")]
        run = load_run(run_dir, single_device, devices=jax.devices()[:1])
        family = model_family(run.cfg.model)
        if not family.generates or family.encoder_decoder:
            raise UserError(f"{run_dir} holds a model.family={run.cfg.model.family} model; sampling preferences needs a decoder run (dense or moe)")
        tokenizer = load_tokenizer(tokenizer_path)
        template = ChatTemplate(run.cfg.chat, tokenizer) if run.cfg.train.objective in CHAT_OBJECTIVES else None
        return cls(run, tokenizer, template)

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.template.prompt_ids(prompt) if self.template else self.tokenizer.encode(prompt)

    @property
    def stop_id(self) -> int:
        return self.template.end_id if self.template else self.tokenizer.eos_id

    def completion(self, ids: Sequence[int]) -> Completion:
        ids = [int(i) for i in ids]
        if self.stop_id in ids:
            ids = ids[: ids.index(self.stop_id) + 1]
        text = self.template.response_text(ids) if self.template else self.tokenizer.decode([i for i in ids if i != self.stop_id])
        return Completion(text, tuple(ids))

    def sample(self, prompts: Sequence[str], samples: int, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0, batch_rows: int = 64, progress: bool = False) -> list[list[Completion]]:
        """`samples` completions of each prompt. Rows are (prompt, sample) pairs in batches of about
        `batch_rows`, prompts of similar length together, each batch with its own key from `seed`:
        the same prompts, seed and batch_rows give the same completions."""
        encoded = [self.prompt_ids(p) for p in prompts]
        for prompt, ids in zip(prompts, encoded):
            if not ids:
                raise GenerateError(f"prompt: expected some text, got an empty prompt ({prompt!r})")
        per_batch = max(1, batch_rows // samples)
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        completions: list[list[Completion]] = [[] for _ in prompts]
        bar = tqdm(total=len(prompts), desc="sample", unit="prompt", dynamic_ncols=True, mininterval=2.0, disable=not progress)
        for start in range(0, len(order), per_batch):
            chosen = order[start:start + per_batch]
            width = LENGTH_BUCKET * math.ceil(max(len(encoded[i]) for i in chosen) / LENGTH_BUCKET)
            tokens = np.zeros((len(chosen) * samples, width), np.int32)
            lengths = np.zeros(len(chosen) * samples, np.int32)
            for row, i in enumerate(np.repeat(chosen, samples)):
                tokens[row, width - len(encoded[i]):] = encoded[i]
                lengths[row] = len(encoded[i])
            out = generate(self.run.model, self.run.params, tokens, max_new_tokens, jax.random.fold_in(jax.random.key(seed), start),
                           temperature=temperature, top_k=top_k, top_p=top_p, eos_id=self.stop_id, prompt_lengths=lengths)
            for row, i in enumerate(np.repeat(chosen, samples)):
                completions[i].append(self.completion(out[row, width:]))
            bar.update(len(chosen))
        bar.close()
        return completions

    def completion_logps(self, prompts: Sequence[str], completions: Sequence[Completion], params=None, batch_rows: int = 64) -> np.ndarray:
        """log p(completion | prompt) [n] summed over the completion's tokens (its stop token
        included) under `params` (default: this run's; e.g. a reference model's of the same shape)."""
        params = self.run.params if params is None else params
        rows = [(self.prompt_ids(p), list(c.ids)) for p, c in zip(prompts, completions)]
        out = np.zeros(len(rows), np.float64)
        for start in range(0, len(rows), batch_rows):
            chunk = rows[start:start + batch_rows]
            width = LENGTH_BUCKET * math.ceil(max(len(a) + len(b) for a, b in chunk) / LENGTH_BUCKET)
            tokens, mask = np.zeros((batch_rows, width), np.int32), np.zeros((batch_rows, width), np.float32)
            for r, (prompt, completion) in enumerate(chunk):
                tokens[r, : len(prompt) + len(completion)] = prompt + completion
                mask[r, len(prompt) - 1 : len(prompt) + len(completion) - 1] = 1  # positions whose NEXT token is generated
            out[start:start + len(chunk)] = np.asarray(_sequence_logps(self.run.model, params, tokens, mask))[: len(chunk)]
        return out


@functools.partial(jax.jit, static_argnames="model")
def _sequence_logps(model, params, tokens_BL, mask_BL):
    logits_BLV = model.apply({"params": nn.unbox(params)}, tokens_BL).astype(jnp.float32)
    logp_BLV = jax.nn.log_softmax(logits_BLV[:, :-1], axis=-1)
    target_logp_BL = jnp.take_along_axis(logp_BLV, tokens_BL[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(target_logp_BL * mask_BL[:, :-1], axis=-1)


def preference_pairs(sources: Sequence[str], prompts: Sequence[str], completions: Sequence[Sequence[Completion]], reward_name: str,
                     min_margin: float = 0.0) -> tuple[list[dict], dict[str, float]]:
    """(DPO records: per prompt its best vs its worst completion when they differ by more than
    `min_margin`, statistics of the rewards)."""
    reward = get_reward(reward_name)
    records, all_rewards = [], []
    for source, prompt, options in zip(sources, prompts, completions):
        rewards = [reward(prompt, c.text) for c in options]
        all_rewards += rewards
        best, worst = int(np.argmax(rewards)), int(np.argmin(rewards))
        if rewards[best] - rewards[worst] > min_margin:
            records.append({"prompt": prompt, "chosen": options[best].text, "rejected": options[worst].text,
                            "reward_chosen": rewards[best], "reward_rejected": rewards[worst], "source": source})
    stats = {"prompts": len(prompts), "samples": len(all_rewards), "mean_reward": float(np.mean(all_rewards)) if all_rewards else 0.0,
             "pairs": len(records)}
    return records, stats


def preferences_command(run_dir: Path, prompts_path: Path, reward_name: str, out: Path, samples: int = 4,
                        max_new_tokens: int = 128, temperature: float = 1.0, max_prompts: int | None = None, seed: int = 0,
                        min_margin: float = 0.0, prompt_key: str = "prompt", max_prompt_tokens: int | None = None,
                        force: bool = False) -> dict[str, float]:
    """`lmjax data preferences`: see the module docstring."""
    get_reward(reward_name)  # a misspelt reward fails before anything loads
    if samples < 2:
        raise UserError(f"--samples: expected >= 2 completions per prompt to compare, got {samples}")
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to overwrite it")
    if not prompts_path.is_file():
        raise UserError(f"--prompts: {prompts_path} not found; expected a JSONL file of records with a '{prompt_key}' field")
    records = read_prompts(prompts_path, prompt_key)[:max_prompts]
    sampler = Sampler.load(run_dir)
    if max_prompt_tokens is not None:  # long prompts leave no room for an answer in a short context
        records = [(s, p) for s, p in records if len(sampler.prompt_ids(p)) <= max_prompt_tokens]
    sources, prompts = [s for s, _ in records], [p for _, p in records]
    completions = sampler.sample(prompts, samples, max_new_tokens, temperature, seed=seed, progress=True)
    pairs, stats = preference_pairs(sources, prompts, completions, reward_name, min_margin)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, "".join(json.dumps(r) + "\n" for r in pairs))
    print(f"{out}: {stats['pairs']} pairs from {stats['prompts']} prompts x {samples} samples "
          f"(mean {reward_name} reward {stats['mean_reward']:.3f}; prompts whose samples all score alike are left out)")
    return stats

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

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

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

    def completion_text(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self.template:
            return self.template.response_text(ids)
        return self.tokenizer.decode(ids[: ids.index(self.stop_id)] if self.stop_id in ids else ids)

    def sample(self, prompts: Sequence[str], samples: int, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0, batch_rows: int = 64) -> list[list[str]]:
        """`samples` completions of each prompt. Rows are (prompt, sample) pairs in batches of about
        `batch_rows`, prompts of similar length together, each batch with its own key from `seed`:
        the same prompts, seed and batch_rows give the same completions."""
        encoded = [self.prompt_ids(p) for p in prompts]
        for prompt, ids in zip(prompts, encoded):
            if not ids:
                raise GenerateError(f"prompt: expected some text, got an empty prompt ({prompt!r})")
        per_batch = max(1, batch_rows // samples)
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        completions: list[list[str]] = [[] for _ in prompts]
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
                completions[i].append(self.completion_text(out[row, width:]))
        return completions


def preference_pairs(sources: Sequence[str], prompts: Sequence[str], completions: Sequence[Sequence[str]], reward_name: str,
                     min_margin: float = 0.0) -> tuple[list[dict], dict[str, float]]:
    """(DPO records: per prompt its best vs its worst completion when they differ by more than
    `min_margin`, statistics of the rewards)."""
    reward = get_reward(reward_name)
    records, all_rewards = [], []
    for source, prompt, options in zip(sources, prompts, completions):
        rewards = [reward(prompt, c) for c in options]
        all_rewards += rewards
        best, worst = int(np.argmax(rewards)), int(np.argmin(rewards))
        if rewards[best] - rewards[worst] > min_margin:
            records.append({"prompt": prompt, "chosen": options[best], "rejected": options[worst],
                            "reward_chosen": rewards[best], "reward_rejected": rewards[worst], "source": source})
    stats = {"prompts": len(prompts), "samples": len(all_rewards), "mean_reward": float(np.mean(all_rewards)) if all_rewards else 0.0,
             "pairs": len(records)}
    return records, stats


def preferences_command(run_dir: Path, prompts_path: Path, reward_name: str, out: Path, samples: int = 4,
                        max_new_tokens: int = 128, temperature: float = 1.0, max_prompts: int | None = None, seed: int = 0,
                        min_margin: float = 0.0, prompt_key: str = "prompt", force: bool = False) -> dict[str, float]:
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
    sources, prompts = [s for s, _ in records], [p for _, p in records]
    completions = sampler.sample(prompts, samples, max_new_tokens, temperature, seed=seed)
    pairs, stats = preference_pairs(sources, prompts, completions, reward_name, min_margin)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, "".join(json.dumps(r) + "\n" for r in pairs))
    print(f"{out}: {stats['pairs']} pairs from {stats['prompts']} prompts x {samples} samples "
          f"(mean {reward_name} reward {stats['mean_reward']:.3f}; prompts whose samples all score alike are left out)")
    return stats

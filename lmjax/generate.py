"""Sampling from a decoder LM with a KV cache.

`generate` prefills the cache with the whole prompt in one call, then decodes one token per step
inside a single jitted `lax.while_loop`, so the prefix is never recomputed and the loop stops as
soon as every row has emitted `eos_id`. All prompts of a batch have the same length (the prompt
is a [batch, prompt_len] array): the model attends to every prompt token, so there is no left
padding; batch prompts of different lengths by length, or generate them one at a time.
"""

from __future__ import annotations

import functools
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmjax.config import load_config
from lmjax.errors import UserError
from lmjax.models import model_family
from lmjax.models.decoder import init_cache


class GenerateError(UserError):
    """Invalid sampling settings or prompt."""


def _check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if temperature < 0:
        raise GenerateError(f"temperature: expected >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise GenerateError(f"top_k: expected >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise GenerateError(f"top_p: expected a value in (0, 1] (1 = off), got {top_p}")


def sample_logits(
    logits_BV: jax.Array, rng: jax.Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
    """One token id per row [B] (int32) from logits [B, V].

    temperature 0 is greedy (argmax; top_k and top_p are then irrelevant). top_k > 0 keeps the k
    largest logits. top_p < 1 keeps the nucleus: the smallest set of most likely tokens whose
    probability (after temperature and top-k) sums to at least top_p (Holtzman et al. 2020).
    """
    _check_sampling(temperature, top_k, top_p)
    logits_BV = logits_BV.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    if 0 < top_k < logits_BV.shape[-1]:
        kth_largest_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_largest_B1, -jnp.inf, logits_BV)
    if top_p < 1.0:
        order_BV = jnp.argsort(-logits_BV, axis=-1)
        sorted_probs_BV = jax.nn.softmax(jnp.take_along_axis(logits_BV, order_BV, axis=-1), axis=-1)
        # A token is in the nucleus when the tokens ranked before it sum to less than top_p.
        mass_before_BV = jnp.cumsum(sorted_probs_BV, axis=-1) - sorted_probs_BV
        keep_sorted_BV = mass_before_BV < top_p
        rank_BV = jnp.argsort(order_BV, axis=-1)  # inverse permutation: back to vocabulary order
        keep_BV = jnp.take_along_axis(keep_sorted_BV, rank_BV, axis=-1)
        logits_BV = jnp.where(keep_BV, logits_BV, -jnp.inf)
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id")
)
def _generate(
    model: nn.Module,
    params,
    prompt_BP: jax.Array,
    rng: jax.Array,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    eos_id: int | None,
) -> jax.Array:
    batch, prompt_len = prompt_BP.shape
    total_len = prompt_len + max_new_tokens
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
    fill = 0 if eos_id is None else eos_id
    tokens_BL = jnp.concatenate([prompt_BP, jnp.full((batch, max_new_tokens), fill, prompt_BP.dtype)], axis=1)

    def step_model(cache, tokens_BT, first_position):
        positions_BT = jnp.broadcast_to(first_position + jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        logits_BTV, variables = model.apply(
            {"params": params, "cache": cache}, tokens_BT, positions_BT, decode=True, mutable=["cache"]
        )
        return logits_BTV[:, -1], variables["cache"]

    def emit(tokens_BL, finished_B, logits_BV, index):
        token_B = sample(logits_BV, jax.random.fold_in(rng, index)).astype(tokens_BL.dtype)
        if eos_id is not None:
            token_B = jnp.where(finished_B, eos_id, token_B)
            finished_B = finished_B | (token_B == eos_id)
        tokens_BL = jax.lax.dynamic_update_slice(tokens_BL, token_B[:, None], (0, index))
        return tokens_BL, finished_B

    cache = init_cache(model, batch, total_len)
    logits_BV, cache = step_model(cache, prompt_BP, 0)
    tokens_BL, finished_B = emit(tokens_BL, jnp.zeros((batch,), bool), logits_BV, prompt_len)

    # Index `i` is the position of the next token to write; the token at i - 1 is fed to the model.
    def keep_going(state):
        i, _, _, finished_B = state
        return (i < total_len) & ~jnp.all(finished_B)

    def decode_one(state):
        i, cache, tokens_BL, finished_B = state
        last_B1 = jax.lax.dynamic_slice_in_dim(tokens_BL, i - 1, 1, axis=1)
        logits_BV, cache = step_model(cache, last_B1, i - 1)
        tokens_BL, finished_B = emit(tokens_BL, finished_B, logits_BV, i)
        return i + 1, cache, tokens_BL, finished_B

    state = (jnp.asarray(prompt_len + 1), cache, tokens_BL, finished_B)
    return jax.lax.while_loop(keep_going, decode_one, state)[2]


def generate(
    model: nn.Module,
    params,
    prompt_tokens,
    max_new_tokens: int,
    rng: jax.Array,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
) -> np.ndarray:
    """Continues each prompt row by `max_new_tokens` tokens; returns [batch, prompt_len + max_new_tokens].

    `model` is a decoder built by `lmjax.models.build_model`, `params` its 'params' collection
    (boxed or not), `prompt_tokens` an integer array [batch, prompt_len] with prompt_len >= 1 (all
    rows the same length). After a row emits `eos_id`, the rest of that row is `eos_id`.
    """
    _check_sampling(temperature, top_k, top_p)
    prompt_BP = jnp.asarray(prompt_tokens)
    if prompt_BP.ndim != 2 or prompt_BP.shape[1] == 0 or not jnp.issubdtype(prompt_BP.dtype, jnp.integer):
        raise GenerateError(f"prompt_tokens: expected a non-empty integer array [batch, prompt_len], got {prompt_BP.dtype} {prompt_BP.shape}")
    if max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    cfg = model.config
    total_len = prompt_BP.shape[1] + max_new_tokens
    if not cfg.use_rope and total_len > cfg.max_seq_len:
        raise GenerateError(f"prompt_len + max_new_tokens = {total_len} exceeds model.max_seq_len ({cfg.max_seq_len})")
    if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
        raise GenerateError(f"eos_id: expected a token id in [0, {cfg.vocab_size}), got {eos_id}")
    tokens = _generate(
        model, nn.unbox(params), prompt_BP.astype(jnp.int32), rng,
        max_new_tokens, float(temperature), int(top_k), float(top_p), eos_id,
    )
    return np.asarray(tokens)


def generate_from_run(
    run_dir: Path,
    prompt: str,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    num_samples: int = 1,
) -> list[str]:
    """`lmjax generate`: continues `prompt` with the latest checkpoint of `run_dir`, on one device."""
    from lmjax.data.tokenizer import load_tokenizer
    from lmjax.evaluate import load_run

    if num_samples < 1:
        raise GenerateError(f"num_samples: expected >= 1, got {num_samples}")
    tokenizer_path = run_dir / "tokenizer.model"
    if not tokenizer_path.exists():
        raise GenerateError(f"{run_dir} has no tokenizer.model; expected a run directory written by `lmjax train`")
    tokenizer = load_tokenizer(tokenizer_path)
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise GenerateError("prompt: expected some text, got an empty prompt")
    if (run_dir / "config.yaml").exists():  # else load_run names what is missing
        model_cfg = load_config(run_dir / "config.yaml").model
        if not model_family(model_cfg).generates:
            raise GenerateError(
                f"{run_dir} holds a model.family={model_cfg.family} model, which does not generate text left to right; "
                "expected a decoder run (family dense or moe)"
            )
    # Sampling is a small batch on one device: whatever mesh the run trained on.
    single_device = [f"mesh.{axis}=1" for axis in ("data", "fsdp", "tensor", "expert")]
    run = load_run(run_dir, single_device, devices=jax.devices()[:1])
    prompts = np.tile(np.asarray(prompt_ids, np.int32), (num_samples, 1))
    tokens = generate(
        run.model, run.params, prompts, max_new_tokens, jax.random.key(seed),
        temperature=temperature, top_k=top_k, top_p=top_p, eos_id=tokenizer.eos_id,
    )
    texts = []
    for row in tokens:
        new = [int(t) for t in row[len(prompt_ids):]]
        if tokenizer.eos_id in new:
            new = new[: new.index(tokenizer.eos_id)]
        texts.append(prompt + tokenizer.decode(new))
    return texts

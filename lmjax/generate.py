"""Sampling from a decoder LM or an encoder-decoder (T5) with a KV cache.

`generate` prefills the cache with the whole prompt in one call, then decodes one token per step
inside a single jitted `lax.while_loop`, so the prefix is never recomputed and the loop stops as
soon as every row has emitted `eos_id`. The prompt is a [batch, prompt_len] array; prompts of
different lengths share one batch (and one compilation) left-padded, with `prompt_lengths`: pad
tokens get segment id 0, which no other token attends to, and each row's real tokens positions
0, 1, ..., so every row generates what it would alone (up to float reordering; MoE layers never
drop tokens while decoding, the prefill included, so capacity dispatch holds this too).
An encoder-decoder runs its encoder on the prompt once; its decoder starts from the decoder start
token, caching the encoder output's cross-attention keys/values at its first call.
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
from lmjax.models.t5 import init_cache as init_seq2seq_cache


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


def _decode_loop(step_model, cache, prefix_BP: jax.Array, rng: jax.Array, max_new_tokens: int, sample, eos_id: int | None) -> jax.Array:
    """Prefills `cache` with the prefix in one call, then decodes one token per step in a
    `lax.while_loop` until `max_new_tokens` are written or every row has emitted eos.
    `step_model(cache, tokens_BT, first_column, prefill)` -> (last logits [B, V], cache), with
    `first_column` the column of tokens_BT[:, 0] in the output."""
    batch, prefix_len = prefix_BP.shape
    total_len = prefix_len + max_new_tokens
    fill = 0 if eos_id is None else eos_id
    tokens_BL = jnp.concatenate([prefix_BP, jnp.full((batch, max_new_tokens), fill, prefix_BP.dtype)], axis=1)

    def emit(tokens_BL, finished_B, logits_BV, index):
        token_B = sample(logits_BV, jax.random.fold_in(rng, index)).astype(tokens_BL.dtype)
        if eos_id is not None:
            token_B = jnp.where(finished_B, eos_id, token_B)
            finished_B = finished_B | (token_B == eos_id)
        tokens_BL = jax.lax.dynamic_update_slice(tokens_BL, token_B[:, None], (0, index))
        return tokens_BL, finished_B

    logits_BV, cache = step_model(cache, prefix_BP, 0, True)
    tokens_BL, finished_B = emit(tokens_BL, jnp.zeros((batch,), bool), logits_BV, prefix_len)

    # Index `i` is the position of the next token to write; the token at i - 1 is fed to the model.
    def keep_going(state):
        i, _, _, finished_B = state
        return (i < total_len) & ~jnp.all(finished_B)

    def decode_one(state):
        i, cache, tokens_BL, finished_B = state
        last_B1 = jax.lax.dynamic_slice_in_dim(tokens_BL, i - 1, 1, axis=1)
        logits_BV, cache = step_model(cache, last_B1, i - 1, False)
        tokens_BL, finished_B = emit(tokens_BL, finished_B, logits_BV, i)
        return i + 1, cache, tokens_BL, finished_B

    state = (jnp.asarray(prefix_len + 1), cache, tokens_BL, finished_B)
    return jax.lax.while_loop(keep_going, decode_one, state)[2]


def _positions_and_segments(tokens_BT: jax.Array, first_column, pad_B: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """Positions and segment ids [B, T] of the columns first_column, first_column + 1, ... Row b's
    first pad_B[b] columns are left padding (segment 0, position clipped to 0); its real tokens are
    segment 1 at positions column - pad_B[b], as if the row were alone. Without padding (pad_B
    None) positions are the columns and segment ids None (the model's one-sequence default)."""
    columns_BT = jnp.broadcast_to(first_column + jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    if pad_B is None:
        return columns_BT, None
    return jnp.maximum(columns_BT - pad_B[:, None], 0), (columns_BT >= pad_B[:, None]).astype(jnp.int32)


_STATIC = ("model", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate(model, params, prompt_BP, pad_B, rng, max_new_tokens, temperature, top_k, top_p, eos_id) -> jax.Array:
    """Decoder LM: the prompt is the prefix the cache is prefilled with; `pad_B` (or None) the
    number of left pad columns of each row, a traced array, so one compilation serves any mix."""

    def step_model(cache, tokens_BT, first_column, prefill):
        positions_BT, segment_ids_BT = _positions_and_segments(tokens_BT, first_column, pad_B)
        logits_BTV, variables = model.apply(
            {"params": params, "cache": cache}, tokens_BT, positions_BT, segment_ids_BT, decode=True, mutable=["cache"]
        )
        return logits_BTV[:, -1], variables["cache"]

    batch, prompt_len = prompt_BP.shape
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
    cache = init_cache(model, batch, prompt_len + max_new_tokens)
    return _decode_loop(step_model, cache, prompt_BP, rng, max_new_tokens, sample, eos_id)


@functools.partial(jax.jit, static_argnames=(*_STATIC, "start_id"))
def _generate_seq2seq(model, params, prompt_BP, pad_B, rng, max_new_tokens, temperature, top_k, top_p, eos_id, start_id) -> jax.Array:
    """Encoder-decoder: the encoder reads the prompt once; the decoder starts from `start_id`, its
    first call caches the encoder output's cross-attention keys/values, later calls read them.
    Left padding of the prompt is encoder segment 0, which neither encoder nor decoder attends to."""
    encoder_positions_BP, encoder_segment_ids_BP = _positions_and_segments(prompt_BP, 0, pad_B)
    encoded_BSD = model.apply({"params": params}, prompt_BP, encoder_positions_BP, encoder_segment_ids_BP, method=model.encode)

    def step_model(cache, tokens_BT, first_column, prefill):
        logits_BTV, variables = model.apply(
            {"params": params, "cache": cache}, tokens_BT, encoded_BSD if prefill else None, encoder_segment_ids_BP,
            positions=_positions_and_segments(tokens_BT, first_column, None)[0], decode=True, mutable=["cache"],
            method=model.decode,
        )
        return logits_BTV[:, -1], variables["cache"]

    batch, prompt_len = prompt_BP.shape
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
    cache = init_seq2seq_cache(model, batch, 1 + max_new_tokens, prompt_len)
    start_B1 = jnp.full((batch, 1), start_id, prompt_BP.dtype)
    return _decode_loop(step_model, cache, start_B1, rng, max_new_tokens, sample, eos_id)


def _left_padding(prompt_lengths, batch: int, prompt_len: int) -> jax.Array:
    """Pad columns per row [batch] (int32) from `prompt_lengths`, checked."""
    lengths_B = np.asarray(prompt_lengths)
    if lengths_B.shape != (batch,) or not np.issubdtype(lengths_B.dtype, np.integer):
        raise GenerateError(f"prompt_lengths: expected an integer array of shape ({batch},), got {lengths_B.dtype} {lengths_B.shape}")
    if batch and not 1 <= lengths_B.min() <= lengths_B.max() <= prompt_len:
        raise GenerateError(
            f"prompt_lengths: expected lengths in [1, {prompt_len}] (prompt_len), got min {lengths_B.min()}, max {lengths_B.max()}"
        )
    return jnp.asarray(prompt_len - lengths_B, jnp.int32)


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
    decoder_start_id: int = 0,
    prompt_lengths=None,
) -> np.ndarray:
    """Continues each prompt row by `max_new_tokens` tokens; returns [batch, prompt_len + max_new_tokens].

    `model` is built by `lmjax.models.build_model`, `params` its 'params' collection (boxed or
    not), `prompt_tokens` an integer array [batch, prompt_len] with prompt_len >= 1. Without
    `prompt_lengths` every row is a whole prompt; with it (integers [batch] in [1, prompt_len]) the
    prompts are left-padded: row b's prompt is its last prompt_lengths[b] columns (the pad columns
    may hold any id) and the row continues as that prompt alone would. After a row emits `eos_id`,
    the rest of that row is `eos_id`. An encoder-decoder (T5) reads the prompt with its encoder and
    returns the decoder's tokens instead, [batch, 1 + max_new_tokens], starting with
    `decoder_start_id` (T5: pad, 0).
    """
    _check_sampling(temperature, top_k, top_p)
    prompt_BP = jnp.asarray(prompt_tokens)
    if prompt_BP.ndim != 2 or prompt_BP.shape[1] == 0 or not jnp.issubdtype(prompt_BP.dtype, jnp.integer):
        raise GenerateError(f"prompt_tokens: expected a non-empty integer array [batch, prompt_len], got {prompt_BP.dtype} {prompt_BP.shape}")
    if max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    cfg = model.config
    total_len = prompt_BP.shape[1] + max_new_tokens
    if cfg.position_kind == "learned" and total_len > cfg.max_seq_len:
        raise GenerateError(f"prompt_len + max_new_tokens = {total_len} exceeds model.max_seq_len ({cfg.max_seq_len})")
    for name, token_id in (("eos_id", eos_id), ("decoder_start_id", decoder_start_id)):
        if token_id is not None and not 0 <= token_id < cfg.vocab_size:
            raise GenerateError(f"{name}: expected a token id in [0, {cfg.vocab_size}), got {token_id}")
    pad_B = None if prompt_lengths is None else _left_padding(prompt_lengths, *prompt_BP.shape)
    args = (model, nn.unbox(params), prompt_BP.astype(jnp.int32), pad_B, rng, max_new_tokens)
    args += (float(temperature), int(top_k), float(top_p), eos_id)
    if model_family(cfg).encoder_decoder:
        return np.asarray(_generate_seq2seq(*args, start_id=decoder_start_id))
    return np.asarray(_generate(*args))


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
    """`lmjax generate`: continues `prompt` with the latest checkpoint of `run_dir`, on one device.
    A chat run (objective sft or dpo) reads it as a user turn and returns the assistant's answer."""
    from lmjax.data.tokenizer import load_tokenizer
    from lmjax.evaluate import load_run

    if num_samples < 1:
        raise GenerateError(f"num_samples: expected >= 1, got {num_samples}")
    tokenizer_path = run_dir / "tokenizer.model"
    if not tokenizer_path.exists():
        from lmjax.config_source import missing_tokenizer

        raise GenerateError(missing_tokenizer(run_dir))
    tokenizer = load_tokenizer(tokenizer_path)
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise GenerateError("prompt: expected some text, got an empty prompt")
    if (run_dir / "config.yaml").exists():  # else load_run names what is missing
        model_cfg = load_config(run_dir / "config.yaml").model
        if not model_family(model_cfg).generates:
            raise GenerateError(
                f"{run_dir} holds a model.family={model_cfg.family} model, which does not generate text left to right; "
                "expected a decoder or encoder-decoder run (family dense, moe or t5)"
            )
    # Sampling is a small batch on one device: whatever mesh the run trained on.
    single_device = [f"mesh.{axis}=1" for axis in ("data", "fsdp", "tensor", "expert")]
    run = load_run(run_dir, single_device, devices=jax.devices()[:1])
    seq2seq = model_family(run.cfg.model).encoder_decoder
    template, stop_id = None, tokenizer.eos_id
    if run.cfg.train.objective in ("sft", "dpo"):  # a chat model answers the prompt as a user turn
        from lmjax.data.chat import ChatTemplate

        template = ChatTemplate(run.cfg.chat, tokenizer)
        prompt_ids, stop_id = template.prompt_ids(prompt), template.end_id
    if seq2seq:  # the encoder reads the prompt as it read its training inputs: ending in eos
        prompt_ids = prompt_ids + [tokenizer.eos_id]
    prompts = np.tile(np.asarray(prompt_ids, np.int32), (num_samples, 1))
    tokens = generate(
        run.model, run.params, prompts, max_new_tokens, jax.random.key(seed),
        temperature=temperature, top_k=top_k, top_p=top_p, eos_id=stop_id, decoder_start_id=tokenizer.pad_id,
    )
    texts = []
    for row in tokens:
        new = [int(t) for t in row[1 if seq2seq else len(prompt_ids):]]
        if template is not None:  # the assistant's answer alone
            texts.append(template.response_text(new))
            continue
        if stop_id in new:
            new = new[: new.index(stop_id)]
        # A decoder continues the prompt; an encoder-decoder's output is its answer alone.
        texts.append(tokenizer.decode(new) if seq2seq else prompt + tokenizer.decode(new))
    return texts

"""T5 span corruption (Raffel et al. 2020): a seeded row layout of encoder inputs and decoder targets.

A noise mask marks about `noise_density` of an example's tokens, in spans of mean length
`mean_noise_span_length`. The encoder reads the example with each noise span replaced by one
sentinel (`<extra_id_0>` for the first span, `<extra_id_1>` for the next, ...) and eos; the decoder
predicts each sentinel followed by the span it stands for, then eos:

    tokens   a b c d e f g h                      (noise: c d and g h)
    inputs   a b <extra_id_0> e f <extra_id_1> eos
    targets  <extra_id_0> c d <extra_id_1> g h eos

As in the t5 reference (`t5/data/preprocessors.py`): `random_spans_helper` gives the lengths,
`random_spans_noise_mask` the mask (noise and non-noise tokens each cut into the same number of
random non-empty spans, interleaved non-noise first, so an example starts with text and ends with
noise), `noise_span_to_unique_sentinel` / `nonnoise_span_to_unique_sentinel` the two sides.

One example per row. `data.seq_len` is the encoder length; an example is the largest number of
stream tokens whose corrupted inputs (+ eos) fit in it (T5: 568 tokens -> 512 inputs, 114 targets
at density 0.15, mean span 3), so every full example fills its encoder row exactly, up to rounding,
and its targets fill the decoder row (`decoder_len`). Row r is the window `tokens[r * raw :
(r + 1) * raw]` of the split: as T5 concatenates documents before cutting examples, windows cross
document boundaries and the eos between two documents is a token like any other. The last window
of a split may be shorter; only its real tokens are corrupted. The decoder reads the targets shifted
right by one after pad, T5's decoder start token.

Each row draws from its own generator, seeded by (run seed, stream, global batch index, row index
within the global batch), as in masking.py: the batches are the same for any number of hosts, and a
resumed run corrupts exactly as the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from lmjax.config import SpanCorruptionConfig
from lmjax.data.corpus import DataError
from lmjax.data.pipeline import PackedSplit
from lmjax.data.tokenizer import SENTINEL_FORMAT, Tokenizer, TokenizerError, sentinel_tokens  # noqa: F401 (re-exported)

Batch = dict[str, np.ndarray]


def noise_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of an example of `length` >= 2 tokens, as T5's mask chooses them."""
    # At least one noise and one non-noise token, and at least one span, however short the example.
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    return num_noise, max(round(num_noise / mean_noise_span_length), 1)


def _t5_helper(inputs_length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """T5's `random_spans_helper` with one sentinel per span and an eos on each side."""

    def sizes(tokens: int) -> tuple[int, int]:  # the helper's own counts: no clipping to >= 1 here
        noise = round(tokens * noise_density)
        spans = round(noise / mean_noise_span_length)
        return tokens - noise + spans + 1, noise + spans + 1

    raw = inputs_length - 1
    while sizes(raw + 1)[0] <= inputs_length:
        raw += 1
    targets = sizes(raw)[1]
    if noise_density == 0.5 and targets > inputs_length:  # T5: targets as long as the (rounder) inputs
        raw, targets = raw - 1, targets - 1
    return raw, targets


def _fits(inputs_length: int, noise_density: float, mean_noise_span_length: float) -> bool:
    """Whether every example of 2 ... raw tokens (a split's last window is shorter) fits its rows,
    with at least one noise span: the helper rounds spans to 0 where the mask makes one."""
    raw, targets = _t5_helper(inputs_length, noise_density, mean_noise_span_length)
    for length in range(2, raw + 1):
        noise, spans = noise_counts(length, noise_density, mean_noise_span_length)
        if length - noise + spans + 1 > inputs_length or noise + spans + 1 > targets:
            return False
    return raw >= 2


def span_corruption_lengths(inputs_length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(raw tokens per example, targets length, eos included) for `inputs_length` encoder tokens.

    Every shorter example (a split's last window) is checked too, once here rather than at some batch
    of a run: it must fit both rows and have a non-noise token between any two noise spans."""
    settings = f"span_corruption.noise_density {noise_density}, mean_noise_span_length {mean_noise_span_length}"
    raw, targets = _t5_helper(inputs_length, noise_density, mean_noise_span_length)
    for length in range(2, raw + 1):
        noise, spans = noise_counts(length, noise_density, mean_noise_span_length)
        if spans > length - noise:  # T5 fails here too: no non-noise token between two noise spans
            raise DataError(
                f"{settings}: an example of {length} tokens has {spans} noise spans but {length - noise} other tokens "
                f"to separate them; lower span_corruption.noise_density or raise mean_noise_span_length"
            )
    if not _fits(inputs_length, noise_density, mean_noise_span_length):
        # The shortest that fits: the helper's lengths grow in steps, so search a little way up.
        shortest = next((n for n in range(inputs_length + 1, 2 * inputs_length + 1024)
                         if _fits(n, noise_density, mean_noise_span_length)), None)
        raise DataError(
            f"data.seq_len ({inputs_length}) is too short for span corruption ({settings}): an example with one noise "
            f"span does not fit; {f'use data.seq_len >= {shortest}' if shortest else 'raise data.seq_len'}"
        )
    return raw, targets


@functools.lru_cache(maxsize=None)
def lengths(settings: SpanCorruptionConfig, seq_len: int) -> tuple[int, int]:
    """(raw tokens per row, decoder length) for an encoder of `seq_len` tokens."""
    return span_corruption_lengths(seq_len, settings.noise_density, settings.mean_noise_span_length)


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """[num_segments] lengths >= 1 summing to `num_items`, all such splits equally likely: T5 shuffles
    a 0/1 indicator of which of the num_items - 1 gaps start a new segment."""
    first_in_segment = np.zeros(num_items, np.int64)
    first_in_segment[1:] = rng.permutation(num_items - 1) < num_segments - 1
    return np.bincount(np.cumsum(first_in_segment), minlength=num_segments)


def noise_mask(length: int, noise_density: float, mean_noise_span_length: float, rng: np.random.Generator) -> np.ndarray:
    """T5's `random_spans_noise_mask`: [length] bool, True on noise; starts with non-noise, ends with noise."""
    if length < 2:
        return np.zeros(length, bool)  # T5 masks a 2-token example and keeps the first token: non-noise
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
    if num_spans > length - num_noise:
        raise DataError(f"{num_spans} noise spans need as many non-noise tokens, got {length - num_noise} of {length}; "
                        f"lower span_corruption.noise_density or raise mean_noise_span_length")
    noise_S = _random_segmentation(num_noise, num_spans, rng)
    nonnoise_S = _random_segmentation(length - num_noise, num_spans, rng)
    span_lengths = np.stack([nonnoise_S, noise_S], axis=1).reshape(-1)  # non-noise, noise, non-noise, ...
    return np.repeat(np.arange(2 * num_spans) % 2 == 1, span_lengths)


def corrupt(tokens_L: np.ndarray, mask_L: np.ndarray, sentinel_ids: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), each ending in eos: noise span k becomes sentinel k in the inputs; the
    targets are sentinel k followed by span k, for each span in order."""
    starts_L = mask_L & ~np.concatenate([[False], mask_L[:-1]])
    num_spans = int(starts_L.sum())
    if num_spans > len(sentinel_ids):
        raise DataError(f"an example has {num_spans} noise spans but there are {len(sentinel_ids)} sentinels; "
                        f"set data.tokenizer.sentinels >= {num_spans}")
    sentinels = np.asarray(sentinel_ids, np.int32)[:num_spans]
    inputs = tokens_L.astype(np.int32)  # a copy
    inputs[starts_L] = sentinels
    inputs = inputs[~mask_L | starts_L]  # the rest of each span goes
    targets = np.insert(tokens_L[mask_L].astype(np.int32), np.flatnonzero(starts_L[mask_L]), sentinels)
    return np.append(inputs, np.int32(eos_id)), np.append(targets, np.int32(eos_id))


def sentinel_ids(tokenizer: Tokenizer, count: int) -> np.ndarray:
    """[count] int32 ids of `<extra_id_0>` ... `<extra_id_{count - 1}>`."""
    ids = []
    for piece in sentinel_tokens(count):
        token_id = tokenizer.piece_id(piece)
        if token_id is None:
            raise TokenizerError(
                f"tokenizer {tokenizer.path} has no {piece!r} piece and span corruption needs {count} sentinels here; "
                f"set data.tokenizer.sentinels >= {count} when lmjax trains the tokenizer, or use a tokenizer that has them"
            )
        ids.append(token_id)
    return np.array(ids, np.int32)


def _padded(sequences: list[np.ndarray], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, segment_ids, positions) [B, width] int32: one example per row, then padding."""
    real = np.arange(width) < np.array([len(s) for s in sequences])[:, None]
    tokens = np.full(real.shape, pad_id, np.int32)
    tokens[real] = np.concatenate(sequences)
    return tokens, real.astype(np.int32), np.where(real, np.arange(width), 0).astype(np.int32)


class SpanCorruptionRows:
    """The span-corruption row layout (`pipeline.RowLayout`): one corrupted window per row, as above."""

    def __init__(self, settings: SpanCorruptionConfig, tokenizer: Tokenizer, seed: int):
        self.settings, self.tokenizer, self.seed = settings, tokenizer, seed
        self._plans: dict[int, tuple[int, int, np.ndarray]] = {}

    def identity(self) -> dict:
        return {"rows": "span_corruption", **{f"span_corruption.{k}": v for k, v in dataclasses.asdict(self.settings).items()}}

    def _plan(self, seq_len: int) -> tuple[int, int, np.ndarray]:
        """(raw tokens per row, decoder length, sentinel ids): checked when the data is built, since
        num_rows asks first, rather than at some batch of the run."""
        if seq_len not in self._plans:
            raw, targets_len = lengths(self.settings, seq_len)
            # The longest example has the most spans: the counts grow with the length.
            _, spans = noise_counts(raw, self.settings.noise_density, self.settings.mean_noise_span_length)
            self._plans[seq_len] = raw, targets_len, sentinel_ids(self.tokenizer, spans)
        return self._plans[seq_len]

    def decoder_len(self, seq_len: int) -> int:
        return self._plan(seq_len)[1]

    def sentinels(self, seq_len: int) -> np.ndarray:
        """Ids of the sentinels rows of `seq_len` encoder tokens may use."""
        return self._plan(seq_len)[2]

    def num_rows(self, split: PackedSplit, seq_len: int) -> int:
        return split.num_windows(self._plan(seq_len)[0])

    def batch(self, split, global_rows, host_rows, seq_len, pad_id, key) -> Batch:
        raw, targets_len, sentinels = self._plan(seq_len)
        windows = split.windows(global_rows[host_rows], raw, pad_id)
        real_lengths = (windows["segment_ids"] > 0).sum(axis=1)  # < raw only in a split's last window
        d, m = self.settings.noise_density, self.settings.mean_noise_span_length
        inputs, targets = [], []
        for i, j in enumerate(range(len(global_rows))[host_rows]):
            tokens = windows["tokens"][i, : real_lengths[i]]
            mask = noise_mask(len(tokens), d, m, np.random.default_rng((self.seed, *key, j)))
            example = corrupt(tokens, mask, sentinels, self.tokenizer.eos_id)
            inputs.append(example[0])
            targets.append(example[1])
        encoder_tokens, encoder_segments, encoder_positions = _padded(inputs, seq_len, pad_id)
        targets_BT, decoder_segments, decoder_positions = _padded(targets, targets_len, pad_id)
        # Teacher forcing: the decoder reads pad (T5's start token), then each target before its next.
        shifted = np.concatenate([np.full((len(targets), 1), pad_id, np.int32), targets_BT[:, :-1]], axis=1)
        return {
            "encoder_tokens": encoder_tokens,
            "encoder_segment_ids": encoder_segments,
            "encoder_positions": encoder_positions,
            "decoder_tokens": np.where(decoder_segments > 0, shifted, pad_id).astype(np.int32),
            "decoder_segment_ids": decoder_segments,
            "decoder_positions": decoder_positions,
            "targets": targets_BT,
            "loss_mask": decoder_segments.astype(np.float32),
        }

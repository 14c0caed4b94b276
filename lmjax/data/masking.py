"""Masked-LM corruption (BERT, Devlin et al. 2019): a seeded transform of packed rows.

Of the tokens that stand for text (not padding, not a control or special token), each is selected
for prediction with probability `mask_prob` (or, with `whole_word`, each word is, and all its
pieces with it). A selected token is replaced by `<mask>` with probability `mask_token_fraction`,
by a random regular token with probability `random_token_fraction`, and kept otherwise. The batch
keeps the causal batch's keys: `tokens` (corrupted input), `targets` (the original tokens),
`loss_mask` (1 at selected tokens), `segment_ids` and `positions`.

Each row draws from its own generator, seeded by (run seed, stream, global batch index, row index
within the global batch): the same row is masked the same way whatever the number of hosts, and a
resumed run (which restarts at a global batch index) masks exactly as the uninterrupted one.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lmjax.config import MLMConfig
from lmjax.data.pipeline import PackedSplit
from lmjax.data.tokenizer import Tokenizer, TokenizerError

Batch = dict[str, np.ndarray]


class MaskingTables:
    """Per-token-id facts the masking needs, computed once from the tokenizer."""

    def __init__(self, tokenizer: Tokenizer, settings: MLMConfig, special_tokens: tuple[str, ...]):
        mask_id = tokenizer.piece_id(settings.mask_token)
        if mask_id is None:
            raise TokenizerError(
                f"tokenizer {tokenizer.path} has no {settings.mask_token!r} piece (mlm.mask_token); "
                f"expected one of the tokenizer's special tokens (data.tokenizer.special_tokens)"
            )
        self.mask_id = mask_id
        special = set(tokenizer.control_ids()) | {mask_id}
        special |= {i for i in (tokenizer.piece_id(t) for t in special_tokens) if i is not None}
        self.is_special_V = np.zeros(tokenizer.vocab_size, bool)
        self.is_special_V[sorted(special)] = True
        # Random replacements are regular tokens only: never a <mask>, eos or padding.
        self.random_pool = np.flatnonzero(~self.is_special_V).astype(np.int32)
        pieces = [tokenizer.piece(i) for i in range(tokenizer.vocab_size)]
        # A word starts at a piece that begins with a space (sentencepiece's U+2581), whitespace or
        # punctuation, or that follows a piece ending in one; byte pieces continue a word.
        self.starts_word_V = np.array(
            [not tokenizer.is_byte(i) and bool(p) and not _word_char(p[0]) for i, p in enumerate(pieces)], bool
        )
        self.ends_word_V = np.array(
            [not tokenizer.is_byte(i) and bool(p) and not _word_char(p[-1]) for i, p in enumerate(pieces)], bool
        )


def _word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def word_ids(tokens_L: np.ndarray, selectable_L: np.ndarray, tables: MaskingTables) -> np.ndarray:
    """Word index of each position of a row (0, 1, ...); a special token or padding is a word of its own."""
    starts = tables.starts_word_V[tokens_L] | ~selectable_L
    starts[1:] |= tables.ends_word_V[tokens_L[:-1]] | ~selectable_L[:-1]
    starts[0] = True
    return np.cumsum(starts) - 1


def mask_row(
    tokens_L: np.ndarray, segment_ids_L: np.ndarray, rng: np.random.Generator, settings: MLMConfig, tables: MaskingTables
) -> tuple[np.ndarray, np.ndarray]:
    """(corrupted tokens, selected mask as float32) of one row."""
    length = tokens_L.shape[0]
    select_u, action_u = rng.random(length), rng.random(length)
    random_tokens = tables.random_pool[rng.integers(0, tables.random_pool.shape[0], length)]
    selectable = (segment_ids_L > 0) & ~tables.is_special_V[tokens_L]
    if settings.whole_word:
        select_u = select_u[word_ids(tokens_L, selectable, tables)]  # one draw per word
    selected = selectable & (select_u < settings.mask_prob)
    to_mask = selected & (action_u < settings.mask_token_fraction)
    to_random = selected & ~to_mask & (action_u < settings.mask_token_fraction + settings.random_token_fraction)
    corrupted = np.where(to_mask, tables.mask_id, np.where(to_random, random_tokens, tokens_L))
    return corrupted.astype(np.int32), selected.astype(np.float32)


def mask_batch(
    rows: Batch, row_keys: list[tuple[int, ...]], settings: MLMConfig, tables: MaskingTables
) -> Batch:
    """MLM batch from unshifted rows (`targets` = `tokens`); `row_keys[i]` seeds row i."""
    corrupted, selected = zip(*(
        mask_row(rows["tokens"][i], rows["segment_ids"][i], np.random.default_rng(key), settings, tables)
        for i, key in enumerate(row_keys)
    ))
    return {
        "tokens": np.stack(corrupted),
        "targets": rows["tokens"],
        "segment_ids": rows["segment_ids"],
        "positions": rows["positions"],
        "loss_mask": np.stack(selected),
    }


class MaskedRows:
    """The masked-LM row layout (`pipeline.RowLayout`): windows of L tokens, masked as above."""

    def __init__(self, settings: MLMConfig, tables: MaskingTables, seed: int):
        self.settings, self.tables, self.seed = settings, tables, seed

    def identity(self) -> dict:
        return {"rows": "mlm", **{f"mlm.{k}": v for k, v in dataclasses.asdict(self.settings).items()}}

    def num_rows(self, split: PackedSplit, seq_len: int) -> int:
        return split.num_windows(seq_len)

    def batch(self, split, global_rows, host_rows, seq_len, pad_id, key) -> Batch:
        rows = split.windows(global_rows[host_rows], seq_len, pad_id)
        row_keys = [(self.seed, *key, j) for j in range(len(global_rows))[host_rows]]
        return mask_batch(rows, row_keys, self.settings, self.tables)

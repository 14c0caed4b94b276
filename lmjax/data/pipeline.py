"""Tokenized, packed batches in a resumable grain order; the task chooses how rows become batches.

Each split's documents are tokenized, followed by eos and concatenated in corpus order. Row r of
a split is the window `tokens[r * L : r * L + L + 1]` (L = seq_len): consecutive rows share one
token, so every token but the first is a target exactly once. A row holds pieces of several
documents; `segment_ids` number them 1, 2, ... within the row (0 = padding at the end of the
split), `positions` restart at 0 at each document start and at the row start, and `loss_mask`
is 0 where the target is in another document than the input (no prediction across a boundary)
or is padding.

That is the causal layout (`CausalRows`). Other tasks bring their own `RowLayout`: masked LM
(`masking.MaskedRows`) cuts the stream into non-overlapping windows of L tokens and corrupts them.

Training order: a grain `MapDataset` over row indices, reshuffled each epoch from `cfg.seed`,
repeated forever and batched by the GLOBAL batch size; each host gathers only its contiguous
slice of every global batch, so global batch i is the same for any number of hosts. A layout
that draws random numbers seeds them by (seed, global batch index, row), never by host or time.
The iterator's state is one index, saved with the checkpoint; restoring it gives the exact next
batch.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import grain
import numpy as np

from lmjax.config import Config, data_seed
from lmjax.data.cache import cache_key, cached_folder, file_sha256
from lmjax.data.corpus import DataError, load_corpus
from lmjax.data.tokenizer import Tokenizer, get_tokenizer

logger = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
_ENCODE_CHUNK = 512  # documents per sentencepiece call: bounded memory, all threads busy
TRAIN_STREAM, EVAL_STREAM = 0, 1  # seed streams of randomised layouts: training and eval batches differ


@dataclass(frozen=True)
class PackedSplit:
    """One split as a token stream: `tokens[doc_offsets[i]:doc_offsets[i + 1]]` is document i + eos."""

    tokens: np.ndarray  # [n_tokens] int32
    doc_offsets: np.ndarray  # [n_documents + 1] int64, starting at 0, ending at n_tokens

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def num_rows(self, seq_len: int) -> int:
        return math.ceil((self.num_tokens - 1) / seq_len) if self.num_tokens > 1 else 0

    def num_windows(self, seq_len: int) -> int:
        return math.ceil(self.num_tokens / seq_len)

    def _window(self, row_indices: np.ndarray, seq_len: int, width: int, pad_id: int) -> tuple[np.ndarray, ...]:
        """(tokens, segments, positions) of `width` stream positions from each row start r * seq_len."""
        starts = np.asarray(row_indices, dtype=np.int64)[:, None] * seq_len  # [B, 1]
        index = starts + np.arange(width)  # [B, width] positions in the stream
        is_token = index < self.num_tokens
        tokens = np.where(is_token, self.tokens[np.minimum(index, self.num_tokens - 1)], pad_id)
        document = np.searchsorted(self.doc_offsets, index, side="right") - 1
        segments = np.where(is_token, document - document[:, :1] + 1, 0)
        segment_start = np.maximum(self.doc_offsets[document], starts)
        positions = np.where(is_token, index - segment_start, 0)
        return tokens, segments, positions

    def rows(self, row_indices: np.ndarray, seq_len: int, pad_id: int) -> Batch:
        """The causal batch made of rows `row_indices` (see the module docstring for the fields)."""
        tokens, segments, positions = self._window(row_indices, seq_len, seq_len + 1, pad_id)
        same_document = (segments[:, 1:] == segments[:, :-1]) & (segments[:, :-1] > 0)
        return {
            "tokens": tokens[:, :-1].astype(np.int32),
            "targets": tokens[:, 1:].astype(np.int32),
            "segment_ids": segments[:, :-1].astype(np.int32),
            "positions": positions[:, :-1].astype(np.int32),
            "loss_mask": same_document.astype(np.float32),
        }

    def windows(self, row_indices: np.ndarray, seq_len: int, pad_id: int) -> Batch:
        """Non-overlapping windows `tokens[r * L : r * L + L]`: tokens, segment_ids, positions."""
        tokens, segments, positions = self._window(row_indices, seq_len, seq_len, pad_id)
        return {"tokens": tokens.astype(np.int32), "segment_ids": segments.astype(np.int32), "positions": positions.astype(np.int32)}


class RowLayout(Protocol):
    """How a task turns rows of a packed split into its batch (`lmjax.tasks`)."""

    def identity(self) -> dict[str, Any]:
        """Settings the batches depend on, checked when a checkpoint's iterator state is restored."""

    def num_rows(self, split: PackedSplit, seq_len: int) -> int: ...

    def batch(
        self, split: PackedSplit, global_rows: np.ndarray, host_rows: slice, seq_len: int, pad_id: int, key: tuple[int, int]
    ) -> Batch:
        """The host's part (`host_rows`) of the global batch made of rows `global_rows`; `key` =
        (stream: 0 train / 1 eval, global batch index) seeds any randomness."""


class CausalRows:
    """Shifted rows for next-token prediction (the module docstring)."""

    def identity(self) -> dict[str, Any]:
        return {}  # the original layout: checkpoints written before layouts existed stay valid

    def num_rows(self, split: PackedSplit, seq_len: int) -> int:
        return split.num_rows(seq_len)

    def batch(self, split, global_rows, host_rows, seq_len, pad_id, key) -> Batch:
        return split.rows(global_rows[host_rows], seq_len, pad_id)


def pack_documents(tokenizer: Tokenizer, texts: Sequence[str]) -> PackedSplit:
    """Tokenizes `texts` (batched over all cores) into one stream, each document followed by eos."""
    pieces, lengths = [], []
    for begin in range(0, len(texts), _ENCODE_CHUNK):
        for ids in tokenizer.encode_batch(texts[begin : begin + _ENCODE_CHUNK]):
            pieces.append(np.asarray(ids + [tokenizer.eos_id], dtype=np.int32))
            lengths.append(len(ids) + 1)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    return PackedSplit(tokens=tokens, doc_offsets=np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))


def host_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is not in [0, {process_count})")
    if global_batch_size % process_count:
        raise DataError(
            f"data.global_batch_size ({global_batch_size}) must be divisible by the number of hosts ({process_count})"
        )
    per_host = global_batch_size // process_count
    return slice(process_index * per_host, (process_index + 1) * per_host)


class TrainIterator:
    """Host-local training batches; `get_state()` / `set_state()` resume at the exact next batch.

    The state also records what the order depends on (corpus, seed, batch and row size), so a
    checkpoint restored under a different data config fails instead of silently changing data.
    """

    def __init__(self, grain_iterator: grain.DatasetIterator, identity: dict[str, Any]):
        self._iterator = grain_iterator
        self._identity = identity

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> Batch:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        return {**self._identity, "grain": self._iterator.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        changed = [f"{k}: {state.get(k)!r} -> {v!r}" for k, v in self._identity.items() if state.get(k) != v]
        if changed or "grain" not in state:
            raise DataError(
                f"data-iterator state does not match this data config ({'; '.join(changed) or 'no grain state'}); "
                "resume with the data settings the checkpoint was written with"
            )
        self._iterator.set_state(state["grain"])

    def close(self) -> None:
        """Stops the prefetch threads."""
        self._iterator.close()


@dataclass
class Data:
    """Everything the trainer reads from the data layer (see `build_data`)."""

    tokenizer: Tokenizer
    fingerprint: str
    stats: dict[str, Any]
    train: PackedSplit = field(repr=False)
    validation: PackedSplit = field(repr=False)
    seq_len: int
    global_batch_size: int
    seed: int
    layout: RowLayout = field(default_factory=CausalRows)
    _train_rows: grain.MapDataset = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n_rows = self.layout.num_rows(self.train, self.seq_len)
        if n_rows == 0:
            raise DataError(f"corpus {self.fingerprint}: the training split has no tokens; add documents or lower data.val_fraction")
        # index_shuffle permutes lazily (no index array); repeat() draws a new permutation each epoch.
        self._train_rows = grain.MapDataset.range(n_rows).shuffle(seed=self.seed).repeat()

    def train_iterator(self, process_index: int = 0, process_count: int = 1) -> TrainIterator:
        """Endless host-local batches [global_batch_size / process_count, seq_len] in a seeded order."""
        rows = host_slice(self.global_batch_size, process_index, process_count)
        batches = self._train_rows.batch(self.global_batch_size, drop_remainder=True).map_with_index(
            lambda index, global_rows: self.layout.batch(
                self.train, global_rows, rows, self.seq_len, self.tokenizer.pad_id, (TRAIN_STREAM, index)
            )
        )
        # Two threads gather upcoming batches while the accelerator works on the current one.
        iterator = batches.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)).__iter__()
        identity = {
            "fingerprint": self.fingerprint,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "seq_len": self.seq_len,
            **self.layout.identity(),
        }
        return TrainIterator(iterator, identity)

    def validation_batches(self) -> int:
        """How many eval batches the validation split fills without reading a row twice (at least 1)."""
        return max(1, self.layout.num_rows(self.validation, self.seq_len) // self.global_batch_size)

    def eval_batches(self, n: int, process_index: int = 0, process_count: int = 1) -> list[Batch]:
        """The first `n` validation batches (host-local), the same on every call; rows wrap around."""
        n_rows = self.layout.num_rows(self.validation, self.seq_len)
        if n_rows == 0:
            raise DataError(
                f"corpus {self.fingerprint}: the validation split is empty; raise data.val_fraction "
                f"({self.stats['documents']['val']} of {sum(self.stats['documents'].values())} documents are in it)"
            )
        rows = host_slice(self.global_batch_size, process_index, process_count)
        batches = []
        for i in range(n):
            global_rows = np.arange(i * self.global_batch_size, (i + 1) * self.global_batch_size) % n_rows
            batches.append(
                self.layout.batch(self.validation, global_rows, rows, self.seq_len, self.tokenizer.pad_id, (EVAL_STREAM, i))
            )
        return batches


def _tokenized_splits(cfg: Config, tokenizer: Tokenizer, train_texts: list[str], val_texts: list[str], fingerprint: str) -> tuple[PackedSplit, PackedSplit]:
    """Both splits tokenized, from the cache when present (memory-mapped), else built and cached."""
    key = cache_key(
        fingerprint=fingerprint,
        tokenizer=file_sha256(tokenizer.path),
        val_fraction=cfg.data.val_fraction,
        layout="tokens+eos,int32,v1",
    )

    def build(folder: Path) -> None:
        start = time.perf_counter()
        for name, texts in (("train", train_texts), ("val", val_texts)):
            split = pack_documents(tokenizer, texts)
            np.save(folder / f"{name}_tokens.npy", split.tokens)
            np.save(folder / f"{name}_doc_offsets.npy", split.doc_offsets)
        seconds = round(time.perf_counter() - start, 2)
        logger.info("tokenized corpus %s in %.1fs", fingerprint, seconds)
        (folder / "meta.json").write_text(json.dumps({"fingerprint": fingerprint, "tokenize_seconds": seconds}))

    folder, _ = cached_folder(cfg.data.cache_dir, "tokenized", key, build)
    return tuple(
        PackedSplit(np.load(folder / f"{name}_tokens.npy", mmap_mode="r"), np.load(folder / f"{name}_doc_offsets.npy"))
        for name in ("train", "val")
    )


def build_data(cfg: Config, layout: Callable[[Tokenizer], RowLayout] | None = None) -> Data:
    """Corpus -> tokenizer -> tokenized splits (all cached by content) -> a `Data` for the trainer.

    `layout(tokenizer)` makes the task's row layout (default: causal rows)."""
    corpus = load_corpus(cfg.data)
    train_docs, val_docs = corpus.split(cfg.data.val_fraction)
    train_texts, val_texts = [d.text for d in train_docs], [d.text for d in val_docs]
    tokenizer = get_tokenizer(cfg, train_texts, corpus.fingerprint)
    train, validation = _tokenized_splits(cfg, tokenizer, train_texts, val_texts, corpus.fingerprint)
    seq_len = cfg.data.seq_len
    row_layout = layout(tokenizer) if layout is not None else CausalRows()
    train_rows = row_layout.num_rows(train, seq_len)
    # Tokens the trainer counts per row include an encoder-decoder layout's decoder tokens.
    decoder_len = row_layout.decoder_len(seq_len) if hasattr(row_layout, "decoder_len") else 0
    stats = {
        "documents": {"train": len(train_docs), "val": len(val_docs)},
        "skipped": dict(corpus.skipped),
        "tokens": {"train": train.num_tokens, "val": validation.num_tokens},
        "rows": {"train": train_rows, "val": row_layout.num_rows(validation, seq_len)},
        "train_tokens_per_epoch": train_rows * (seq_len + decoder_len),
        "batches_per_epoch": train_rows / cfg.data.global_batch_size,
    }
    return Data(
        tokenizer=tokenizer,
        fingerprint=corpus.fingerprint,
        stats=stats,
        train=train,
        validation=validation,
        seq_len=seq_len,
        global_batch_size=cfg.data.global_batch_size,
        seed=data_seed(cfg),
        layout=row_layout,
    )

"""Input/target pairs from JSONL, packed into rows for an encoder-decoder (`train.objective: seq2seq`).

Records: each non-blank line of a `data.paths` file is a JSON object whose string fields
`seq2seq.input_key` and `seq2seq.target_key` hold what the encoder reads and what the decoder
learns to write. Anything else (invalid JSON, a missing key, a non-string, an empty target) is an
error naming the file, line and key: a pair dropped silently changes what the model learns.
Validation pairs are the records of `data.val_paths` when given, else those whose INPUT hashes into
`data.val_fraction` (`corpus.is_validation`): pairs sharing an input share a split, so the model is
never scored on an input it trained on.

Every input and target is tokenized and followed by eos; both streams are cached by content. Pairs
are packed greedily in file order: a pair joins the current row if its input still fits the
encoder's `data.seq_len` tokens and its target the decoder's `seq2seq.target_len`, else it starts a
new row (`pack: false`: one pair per row). Pair k of a row has segment id k + 1 on both sides (0 =
padding), so attention masks built from segment ids keep pairs apart; positions restart at 0 per
pair. A pair longer than a row keeps its first tokens and ends in eos again (`overlong: truncate`)
or is left out (`drop`); both are counted in `Data.stats["overlong"]`. The decoder reads each pair's
targets shifted right by one behind the pad id, T5's start token; `loss_mask` is 1 on every real
target token. Rows draw no random numbers: their order is the pipeline's seeded shuffle of rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmjax.config import Config, Seq2SeqConfig
from lmjax.data.cache import cache_key, cached_folder, file_sha256
from lmjax.data.corpus import (
    JSONL_SUFFIXES, DataError, check_disjoint, is_validation, resolve_paths, shared_root, with_validation_fingerprint,
)
from lmjax.data.pipeline import Batch, Data, pack_documents
from lmjax.data.tokenizer import Tokenizer, get_tokenizer

_JSON_TYPES = {dict: "an object", list: "an array", int: "a number", float: "a number", bool: "a boolean", type(None): "null"}


@dataclass(frozen=True)
class Pair:
    name: str  # "file:LINE", the file relative to the folder holding all files of its set
    input: str
    target: str


@dataclass(frozen=True)
class PairCorpus:
    train: list[Pair]
    val: list[Pair]
    fingerprint: str  # the pairs' names and contents, and which ones are validation files
    val_from_files: bool  # validation is data.val_paths (else chosen by a hash of the input)


def _record_pair(record: Any, where: str, name: str, settings: Seq2SeqConfig) -> Pair:
    keys = ((settings.input_key, "input_key"), (settings.target_key, "target_key"))
    expected = " and ".join(f"'{key}' (seq2seq.{setting})" for key, setting in keys)
    expected = f"expected a JSON object with string fields {expected}"
    if not isinstance(record, dict):
        raise DataError(f"{where}: got {_JSON_TYPES.get(type(record), 'a string')}; {expected}")
    for key, setting in keys:
        if key not in record:
            raise DataError(f"{where}: missing key '{key}' (seq2seq.{setting}); {expected}")
        if not isinstance(record[key], str):
            raise DataError(f"{where}: key '{key}' (seq2seq.{setting}) holds {_JSON_TYPES[type(record[key])]}; {expected}")
    if not record[settings.target_key].strip():
        raise DataError(f"{where}: key '{settings.target_key}' (seq2seq.target_key) is empty; every pair needs a target to learn")
    return Pair(name, record[settings.input_key], record[settings.target_key])


def read_pairs(path: Path, name: str, settings: Seq2SeqConfig) -> Iterator[Pair]:
    """The pairs of one JSONL file, in order; blank lines separate records and are not records."""
    if path.suffix.lower() not in JSONL_SUFFIXES:
        what = f"JSONL files ({', '.join(JSONL_SUFFIXES)}) of '{settings.input_key}'/'{settings.target_key}' records"
        raise DataError(f"{path}: train.objective=seq2seq reads {what}, got a '{path.suffix}' file")
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise DataError(f"{where}: not UTF-8 text; expected one JSON object per line") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg}); expected one JSON object per line") from None
            yield _record_pair(record, where, f"{name}:{line_number}", settings)


def _read_files(files: list[Path], settings: Seq2SeqConfig, limit: int | None, key: str) -> list[Pair]:
    root, pairs = shared_root(files), []
    for path in files:
        for pair in read_pairs(path, path.relative_to(root).as_posix(), settings):
            pairs.append(pair)
            if limit is not None and len(pairs) >= limit:
                return pairs  # a capped set is for quick runs
    if not pairs:
        expected = f"'{settings.input_key}' and '{settings.target_key}'"
        raise DataError(f"{key}: no records in {len(files)} file(s); expected JSONL lines with {expected}")
    return pairs


def fingerprint_pairs(pairs: list[Pair]) -> str:
    """Short hex digest of the pairs' names and contents, in order."""
    digest = hashlib.sha256()
    for pair in pairs:
        texts = (hashlib.sha256(text.encode("utf-8")).hexdigest() for text in (pair.input, pair.target))
        digest.update(f"{pair.name}\0{chr(0).join(texts)}\n".encode("utf-8"))
    return digest.hexdigest()[:16]


def load_pairs(cfg: Config) -> PairCorpus:
    """Training pairs of `data.paths` (at most `data.max_documents`) and the validation pairs."""
    data, settings = cfg.data, cfg.seq2seq
    if not data.paths:
        raise DataError("train.objective=seq2seq needs data.paths (JSONL input/target pairs); the built-in corpus is plain text")
    files = resolve_paths(data.paths)
    pairs = _read_files(files, settings, data.max_documents, "data.paths")
    if data.val_paths:
        val_files = resolve_paths(data.val_paths, key="data.val_paths")
        check_disjoint(files, val_files)
        val = _read_files(val_files, settings, None, "data.val_paths")
        return PairCorpus(pairs, val, with_validation_fingerprint(fingerprint_pairs(pairs), fingerprint_pairs(val)), True)
    train, val = [], []
    for pair in pairs:
        (val if is_validation(pair.input, data.val_fraction) else train).append(pair)
    return PairCorpus(train, val, fingerprint_pairs(pairs), False)


@dataclass(frozen=True)
class Packing:
    """Rows as CSR: row r holds pairs `pair_index[row_offsets[r]:row_offsets[r + 1]]`, in order."""

    row_offsets: np.ndarray  # [n_rows + 1] int64
    pair_index: np.ndarray  # [n_packed_pairs] int64
    input_kept: np.ndarray  # [n_pairs] int64: tokens of each pair's input in its row (0 if dropped)
    target_kept: np.ndarray  # [n_pairs] int64
    truncated: int
    dropped: int


def pack_pairs(input_lengths: np.ndarray, target_lengths: np.ndarray, seq_len: int, target_len: int, pack: bool,
               overlong: str) -> Packing:
    """Greedy in-order packing of pairs with these token lengths (eos included); see the module docstring."""
    too_long = (input_lengths > seq_len) | (target_lengths > target_len)
    keep = ~too_long if overlong == "drop" else np.ones_like(too_long)
    input_kept = np.where(keep, np.minimum(input_lengths, seq_len), 0).astype(np.int64)
    target_kept = np.where(keep, np.minimum(target_lengths, target_len), 0).astype(np.int64)
    pair_index = np.flatnonzero(keep).astype(np.int64)
    row_starts, input_used, target_used = [], seq_len + 1, target_len + 1  # "full": the first pair opens a row
    for position, (a, b) in enumerate(zip(input_kept[pair_index].tolist(), target_kept[pair_index].tolist())):
        if not pack or input_used + a > seq_len or target_used + b > target_len:
            row_starts.append(position)
            input_used, target_used = 0, 0
        input_used, target_used = input_used + a, target_used + b
    n_long, dropping = int(too_long.sum()), overlong == "drop"
    row_offsets = np.asarray(row_starts + [len(pair_index)], np.int64)
    return Packing(row_offsets, pair_index, input_kept, target_kept, 0 if dropping else n_long, n_long if dropping else 0)


def _place(stream: np.ndarray, offsets: np.ndarray, pairs: np.ndarray, kept: np.ndarray, row_of_pair: np.ndarray,
           n_rows: int, width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, segment_ids, positions) [n_rows, width]: `pairs` (grouped by row, in order) side by
    side in their rows, each its first `kept` tokens with the last one its own final token (eos)."""
    counts = np.bincount(row_of_pair, minlength=n_rows)
    first_of_row = np.repeat(np.cumsum(counts) - counts, counts)  # index of the row's first pair, per pair
    before = np.cumsum(kept) - kept  # tokens of the earlier pairs, over all rows
    column = before - before[first_of_row]  # where each pair starts in its row
    segment = np.arange(len(pairs)) - first_of_row + 1
    token_pair = np.repeat(np.arange(len(pairs)), kept)
    within = np.arange(int(kept.sum())) - before[token_pair]
    start, end = offsets[pairs][token_pair], offsets[pairs + 1][token_pair]
    source = np.where(within == kept[token_pair] - 1, end - 1, start + within)
    tokens = np.full((n_rows, width), pad_id, np.int32)
    segments, positions = np.zeros((n_rows, width), np.int32), np.zeros((n_rows, width), np.int32)
    where = (row_of_pair[token_pair], column[token_pair] + within)
    tokens[where], segments[where], positions[where] = stream[source], segment[token_pair], within
    return tokens, segments, positions


@dataclass(frozen=True)
class PairSplit:
    """One split's pairs: `inputs[input_offsets[i]:input_offsets[i + 1]]` is input i + eos (and so
    for targets), with their packing into rows of `seq_len` encoder and `target_len` decoder tokens."""

    inputs: np.ndarray  # [n_input_tokens] int32
    input_offsets: np.ndarray  # [n_pairs + 1] int64
    targets: np.ndarray  # [n_target_tokens] int32
    target_offsets: np.ndarray  # [n_pairs + 1] int64
    seq_len: int
    target_len: int
    pack: bool = True
    overlong: str = "truncate"
    packing: Packing = field(init=False, repr=False)

    def __post_init__(self) -> None:
        lengths = np.diff(self.input_offsets), np.diff(self.target_offsets)
        object.__setattr__(self, "packing", pack_pairs(*lengths, self.seq_len, self.target_len, self.pack, self.overlong))

    @property
    def num_pairs(self) -> int:
        return len(self.input_offsets) - 1

    @property
    def num_tokens(self) -> int:
        """Input plus target tokens of all pairs, eos included, before truncation or dropping."""
        return int(self.inputs.shape[0] + self.targets.shape[0])

    @property
    def num_rows(self) -> int:
        return len(self.packing.row_offsets) - 1

    @property
    def overlong_counts(self) -> dict[str, int]:
        return {"truncated": self.packing.truncated, "dropped": self.packing.dropped}

    def rows(self, row_indices: np.ndarray, pad_id: int) -> Batch:
        """The batch made of rows `row_indices` (see the module docstring for the fields)."""
        p, rows = self.packing, np.asarray(row_indices, np.int64)
        counts = p.row_offsets[rows + 1] - p.row_offsets[rows]
        # Entries row_offsets[r] ... row_offsets[r + 1] - 1 of pair_index for each row r, in batch order.
        slots = np.repeat(p.row_offsets[rows] - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))
        pairs, row_of_pair = p.pair_index[slots], np.repeat(np.arange(len(rows)), counts)
        enc = _place(self.inputs, self.input_offsets, pairs, p.input_kept[pairs], row_of_pair, len(rows), self.seq_len, pad_id)
        targets, segments, positions = _place(
            self.targets, self.target_offsets, pairs, p.target_kept[pairs], row_of_pair, len(rows), self.target_len, pad_id
        )
        shifted = np.concatenate([np.full((len(rows), 1), pad_id, np.int32), targets[:, :-1]], axis=1)
        return {
            "encoder_tokens": enc[0],
            "encoder_segment_ids": enc[1],
            "encoder_positions": enc[2],
            "targets": targets,
            "decoder_tokens": np.where(positions > 0, shifted, pad_id).astype(np.int32),  # pad starts every pair
            "decoder_segment_ids": segments,
            "decoder_positions": positions,
            "loss_mask": (segments > 0).astype(np.float32),
        }


class Seq2SeqRows:
    """The row layout of pairs (`pipeline.RowLayout`); the packing itself lives in each `PairSplit`."""

    def __init__(self, settings: Seq2SeqConfig):
        self.settings = settings

    def identity(self) -> dict[str, Any]:
        return {"rows": "seq2seq", **{f"seq2seq.{k}": v for k, v in dataclasses.asdict(self.settings).items()}}

    def decoder_len(self, seq_len: int) -> int:
        return self.settings.target_len

    # The split was packed for (data.seq_len, these settings) by `build_pair_data`, which gives the
    # same seq_len to `Data`; the rows draw no random numbers, so `key` is unused.
    def num_rows(self, split: PairSplit, seq_len: int) -> int:
        return split.num_rows

    def batch(self, split, global_rows, host_rows, seq_len, pad_id, key) -> Batch:
        return split.rows(np.asarray(global_rows)[host_rows], pad_id)


@dataclass
class PairData(Data):
    """`Data` of pairs; its empty-validation error says why, in terms of pairs."""

    empty_validation: str = field(default="the validation split has no pairs", repr=False)

    def eval_batches(self, n: int, process_index: int = 0, process_count: int = 1) -> list[Batch]:
        if self.layout.num_rows(self.validation, self.seq_len) == 0:
            raise DataError(f"pairs {self.fingerprint}: {self.empty_validation}")
        return super().eval_batches(n, process_index, process_count)


def _tokenized_pairs(cfg: Config, tokenizer: Tokenizer, corpus: PairCorpus) -> dict[str, list[np.ndarray]]:
    """split -> [inputs, input_offsets, targets, target_offsets], from the cache when present."""
    val_fraction = None if corpus.val_from_files else cfg.data.val_fraction  # unused with validation files
    key = cache_key(fingerprint=corpus.fingerprint, tokenizer=file_sha256(tokenizer.path), input_key=cfg.seq2seq.input_key,
                    target_key=cfg.seq2seq.target_key, val_fraction=val_fraction, layout="pairs,tokens+eos,int32,v1")

    def build(folder: Path) -> None:
        start = time.perf_counter()
        for split, pairs in (("train", corpus.train), ("val", corpus.val)):
            for side in ("input", "target"):
                packed = pack_documents(tokenizer, [getattr(pair, side) for pair in pairs])
                np.save(folder / f"{split}_{side}_tokens.npy", packed.tokens)
                np.save(folder / f"{split}_{side}_offsets.npy", packed.doc_offsets)
        seconds = round(time.perf_counter() - start, 2)
        (folder / "meta.json").write_text(json.dumps({"fingerprint": corpus.fingerprint, "tokenize_seconds": seconds}))

    folder, _ = cached_folder(cfg.data.cache_dir, "seq2seq", key, build)
    return {
        split: [np.load(folder / f"{split}_{side}_{kind}.npy", mmap_mode="r" if kind == "tokens" else None)
                for side in ("input", "target") for kind in ("tokens", "offsets")]
        for split in ("train", "val")
    }


def _too_long(split: PairSplit) -> str:
    return (f"all {split.num_pairs} pairs are longer than a row (input > data.seq_len {split.seq_len} or target > "
            f"seq2seq.target_len {split.target_len} tokens, eos included) and seq2seq.overlong=drop drops them; "
            "raise the lengths or set seq2seq.overlong=truncate")


def build_pair_data(cfg: Config) -> PairData:
    """JSONL pairs -> tokenizer -> tokenized pairs (cached by content) -> packed rows in a `Data`."""
    corpus = load_pairs(cfg)
    texts = [text for pair in corpus.train for text in (pair.input, pair.target)]  # the tokenizer learns both sides
    tokenizer = get_tokenizer(cfg, texts, corpus.fingerprint)
    s, seq_len = cfg.seq2seq, cfg.data.seq_len
    tokenized = _tokenized_pairs(cfg, tokenizer, corpus)
    train, val = (PairSplit(*tokenized[name], seq_len, s.target_len, s.pack, s.overlong) for name in ("train", "val"))
    if train.num_rows == 0:
        why = _too_long(train) if train.num_pairs else f"all {val.num_pairs} pairs are in validation; lower data.val_fraction"
        raise DataError(f"pairs {corpus.fingerprint}: no training rows: {why}")
    if val.num_pairs == 0:
        empty = f"no input hashed into data.val_fraction ({cfg.data.val_fraction}); raise it or give data.val_paths"
    else:
        empty = f"{'data.val_paths' if corpus.val_from_files else 'validation'}: {_too_long(val)}"
    stats = {
        "documents": {"train": train.num_pairs, "val": val.num_pairs},  # pairs: the key the trainer reads
        "skipped": {},  # a pair is never skipped: a bad record is an error, an over-long one is in "overlong"
        "tokens": {"train": train.num_tokens, "val": val.num_tokens},
        "rows": {"train": train.num_rows, "val": val.num_rows},
        # Encoder and decoder positions of a row, the trainer's tokens per row (Task.tokens_per_row).
        "train_tokens_per_epoch": train.num_rows * (seq_len + s.target_len),
        "batches_per_epoch": train.num_rows / cfg.data.global_batch_size,
        "overlong": {"train": train.overlong_counts, "val": val.overlong_counts},
    }
    return PairData(
        tokenizer=tokenizer, fingerprint=corpus.fingerprint, stats=stats, train=train, validation=val, seq_len=seq_len,
        global_batch_size=cfg.data.global_batch_size, seed=cfg.seed, layout=Seq2SeqRows(s), empty_validation=empty,
    )

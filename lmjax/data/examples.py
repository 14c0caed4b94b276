"""JSONL examples packed into rows: what seq2seq pairs, SFT chats and DPO preference pairs share.

Reading: each non-blank line of a `data.paths` file is one JSON record; the objective's `parse`
turns it into an example or raises a `DataError` naming the file, line and key (a record dropped
silently changes what the model learns). Validation examples are the records of `data.val_paths`
when given, else those whose `split_text` (the input, the prompt) hashes into `data.val_fraction`
(`corpus.is_validation`): examples sharing a prompt share a split, so the model is never scored on
a prompt it trained on.

Packing: an example is one token sequence per row stream (seq2seq: encoder input and decoder
target; DPO: the chosen and the rejected sequence; SFT: one). Examples are packed greedily in file
order: an example joins the current row if every one of its sequences still fits its stream's
width, else it opens a new row (`pack: false`: one example per row). Example k of a row has
segment id k + 1 in every stream (0 = padding) and positions restarting at 0, so attention masks
built from segment ids keep examples apart and the streams of one example share its segment id.
An example longer than a row keeps its first tokens (`overlong: truncate`) or is left out
(`drop`); both are counted. Rows draw no random numbers: their order is the pipeline's seeded
shuffle of rows.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from lmjax.config import Config
from lmjax.data.corpus import (
    JSONL_SUFFIXES, DataError, check_disjoint, is_validation, resolve_paths, shared_root, with_validation_fingerprint,
)
from lmjax.data.pipeline import EVAL_STREAM, Batch, Data, host_slice

JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
              type(None): "null"}
Example = TypeVar("Example")


def read_records(path: Path, objective: str, expected: str) -> Iterator[tuple[str, int, Any]]:
    """(`path:LINE`, LINE, record) of one JSONL file, in order; blank lines are not records."""
    if path.suffix.lower() not in JSONL_SUFFIXES:
        raise DataError(f"{path}: train.objective={objective} reads JSONL files ({', '.join(JSONL_SUFFIXES)}), each line "
                        f"{expected}, got a '{path.suffix}' file")
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
            if not isinstance(record, dict):
                raise DataError(f"{where}: got {JSON_TYPES.get(type(record), 'a value')}; expected {expected}")
            yield where, line_number, record


def string_field(record: dict, key: str, setting: str, where: str, expected: str, non_empty: bool = False) -> str:
    """`record[key]` if it is a string (non-empty when asked), else a one-line error naming the
    line, the key and the config setting that names it."""
    if key not in record:
        raise DataError(f"{where}: missing key '{key}' ({setting}); expected {expected}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: key '{key}' ({setting}) holds {JSON_TYPES.get(type(value), 'a value')}; expected {expected}")
    if non_empty and not value.strip():
        raise DataError(f"{where}: key '{key}' ({setting}) is empty; every example needs text to learn")
    return value


@dataclass(frozen=True)
class ExampleSet(Generic[Example]):
    train: list[Example]
    val: list[Example]
    fingerprint: str  # the examples' names and contents, and which ones are validation files
    val_from_files: bool  # validation is data.val_paths (else chosen by a hash of `split_text`)


def fingerprint_examples(examples: Sequence[Any]) -> str:
    """Short hex digest of the examples' names (`file:LINE`) and texts, in order."""
    digest = hashlib.sha256()
    for example in examples:
        texts = (hashlib.sha256(text.encode("utf-8")).hexdigest() for text in example.texts)
        digest.update(f"{example.name}\0{chr(0).join(texts)}\n".encode("utf-8"))
    return digest.hexdigest()[:16]


def _read_files(files: list[Path], objective: str, expected: str, parse: Callable[[dict, str, str], Example],
                limit: int | None, key: str) -> list[Example]:
    root, examples = shared_root(files), []
    for path in files:
        name = path.relative_to(root).as_posix()
        for where, line, record in read_records(path, objective, expected):
            examples.append(parse(record, where, f"{name}:{line}"))
            if limit is not None and len(examples) >= limit:
                return examples  # a capped set is for quick runs
    if not examples:
        raise DataError(f"{key}: no records in {len(files)} file(s); each line {expected}")
    return examples


def load_examples(cfg: Config, expected: str, parse: Callable[[dict, str, str], Example],
                  split_text: Callable[[Example], str]) -> ExampleSet[Example]:
    """Training examples of `data.paths` (at most `data.max_documents`) and the validation ones.
    `parse(record, where, name)` makes an example (with `.name` and `.texts`) or raises."""
    data, objective = cfg.data, cfg.train.objective
    if not data.paths:
        raise DataError(f"train.objective={objective} needs data.paths (JSONL files, each line {expected}); the built-in corpus is plain text")
    files = resolve_paths(data.paths)
    examples = _read_files(files, objective, expected, parse, data.max_documents, "data.paths")
    if data.val_paths:
        val_files = resolve_paths(data.val_paths, key="data.val_paths")
        check_disjoint(files, val_files)
        val = _read_files(val_files, objective, expected, parse, None, "data.val_paths")
        fingerprint = with_validation_fingerprint(fingerprint_examples(examples), fingerprint_examples(val))
        return ExampleSet(examples, val, fingerprint, True)
    train, val = [], []
    for example in examples:
        (val if is_validation(split_text(example), data.val_fraction) else train).append(example)
    return ExampleSet(train, val, fingerprint_examples(examples), False)


# ----------------------------------------------------------------------------- packing


@dataclass(frozen=True)
class Packing:
    """Rows as CSR: row r holds examples `example_index[row_offsets[r]:row_offsets[r + 1]]`, in order."""

    row_offsets: np.ndarray  # [n_rows + 1] int64
    example_index: np.ndarray  # [n_packed_examples] int64
    kept: np.ndarray  # [n_streams, n_examples] int64: tokens of each example in its row (0 if dropped)
    truncated: int
    dropped: int

    @property
    def num_rows(self) -> int:
        return len(self.row_offsets) - 1

    def examples_of(self, row_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(examples of these rows grouped by row and in order, the batch row of each). A negative
        row index is an empty row (eval batches padded past the end of a split)."""
        rows = np.asarray(row_indices, np.int64)
        real = np.maximum(rows, 0)
        counts = np.where(rows >= 0, self.row_offsets[real + 1] - self.row_offsets[real], 0)
        # Entries row_offsets[r] ... row_offsets[r + 1] - 1 of example_index for each row r, in batch order.
        slots = np.repeat(self.row_offsets[real] - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))
        return self.example_index[slots], np.repeat(np.arange(len(rows)), counts)


def pack_examples(lengths: Sequence[np.ndarray], widths: Sequence[int], pack: bool, overlong: str,
                  must_fit: np.ndarray | None = None) -> Packing:
    """Greedy in-order packing of examples whose sequence `s` has `lengths[s]` tokens into rows of
    `widths[s]` tokens per stream (see the module docstring). `must_fit` [n_examples] bool marks
    examples that may not be truncated (they are dropped, and counted, even with `truncate`)."""
    lengths = np.stack([np.asarray(n, np.int64) for n in lengths])
    widths_S1 = np.asarray(widths, np.int64)[:, None]
    too_long = np.any(lengths > widths_S1, axis=0)
    keep = ~too_long if overlong == "drop" else np.ones_like(too_long)
    if must_fit is not None:
        keep &= ~(too_long & must_fit)
    kept = np.where(keep, np.minimum(lengths, widths_S1), 0)
    example_index = np.flatnonzero(keep).astype(np.int64)
    row_starts, used = [], widths_S1[:, 0] + 1  # "full": the first example opens a row
    for position, sizes in enumerate(kept[:, example_index].T):
        if not pack or np.any(used + sizes > widths_S1[:, 0]):
            row_starts.append(position)
            used = np.zeros_like(used)
        used = used + sizes
    n_long, n_dropped = int(too_long.sum()), int((too_long & ~keep).sum())
    row_offsets = np.asarray(row_starts + [len(example_index)], np.int64)
    return Packing(row_offsets, example_index, kept, n_long - n_dropped, n_dropped)


def place(streams: Sequence[np.ndarray], fills: Sequence[int | float], offsets: np.ndarray, examples: np.ndarray,
          kept: np.ndarray, row_of_example: np.ndarray, n_rows: int, width: int, keep_last: bool) -> list[np.ndarray]:
    """Each of `streams` (aligned: example i is `stream[offsets[i]:offsets[i + 1]]` in all of them)
    as [n_rows, width] with `examples` (grouped by row, in order) side by side in their rows, each
    its first `kept` tokens (`keep_last`: the last of them its own final token, e.g. eos), the rest
    `fills`; then the segment ids and the positions."""
    counts = np.bincount(row_of_example, minlength=n_rows)
    first_of_row = np.repeat(np.cumsum(counts) - counts, counts)  # index of the row's first example, per example
    before = np.cumsum(kept) - kept  # tokens of the earlier examples, over all rows
    column = before - before[first_of_row]  # where each example starts in its row
    segment = np.arange(len(examples)) - first_of_row + 1
    token_example = np.repeat(np.arange(len(examples)), kept)
    within = np.arange(int(kept.sum())) - before[token_example]
    start, end = offsets[examples][token_example], offsets[examples + 1][token_example]
    source = np.where(within == kept[token_example] - 1, end - 1, start + within) if keep_last else start + within
    where = (row_of_example[token_example], column[token_example] + within)
    out = []
    for stream, fill in zip(streams, fills):
        array = np.full((n_rows, width), fill, stream.dtype)
        array[where] = stream[source]
        out.append(array)
    segments, positions = np.zeros((n_rows, width), np.int32), np.zeros((n_rows, width), np.int32)
    segments[where], positions[where] = segment[token_example], within
    return [*out, segments, positions]


@dataclass
class ExampleData(Data):
    """`Data` of packed examples: its empty-validation error says why in terms of examples, and an
    evaluation reads every validation row at most once (a last partial batch is padded with empty
    rows, which count nothing), so a validation split smaller than one batch still evaluates."""

    empty_validation: str = field(default="the validation split has no examples", repr=False)

    def validation_batches(self) -> int:
        return max(1, math.ceil(self.layout.num_rows(self.validation, self.seq_len) / self.global_batch_size))

    def eval_batches(self, n: int, process_index: int = 0, process_count: int = 1) -> list[Batch]:
        n_rows = self.layout.num_rows(self.validation, self.seq_len)
        if n_rows == 0:
            raise DataError(f"examples {self.fingerprint}: {self.empty_validation}")
        rows, batch = host_slice(self.global_batch_size, process_index, process_count), self.global_batch_size
        batches = []
        for i in range(min(n, math.ceil(n_rows / batch))):
            global_rows = np.arange(i * batch, (i + 1) * batch)
            global_rows = np.where(global_rows < n_rows, global_rows, -1)
            batches.append(self.layout.batch(self.validation, global_rows, rows, self.seq_len, self.tokenizer.pad_id, (EVAL_STREAM, i)))
        return batches


def example_stats(cfg: Config, train: Any, val: Any, tokens_per_row: int) -> dict[str, Any]:
    """The `Data.stats` of packed examples (`train`/`val` have num_examples, num_tokens, num_rows
    and overlong_counts); "documents" holds examples, the key the trainer reads."""
    return {
        "documents": {"train": train.num_examples, "val": val.num_examples},
        "skipped": {},  # an example is never skipped: a bad record is an error, an over-long one is in "overlong"
        "tokens": {"train": train.num_tokens, "val": val.num_tokens},
        "rows": {"train": train.num_rows, "val": val.num_rows},
        "train_tokens_per_epoch": train.num_rows * tokens_per_row,
        "batches_per_epoch": train.num_rows / cfg.data.global_batch_size,
        "overlong": {"train": train.overlong_counts, "val": val.overlong_counts},
    }

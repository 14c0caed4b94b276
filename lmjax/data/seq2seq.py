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
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmjax.config import Config, Seq2SeqConfig, data_seed
from lmjax.data.cache import cache_key, cached_folder, file_sha256
from lmjax.data.corpus import DataError
from lmjax.data.examples import ExampleData, ExampleSet, Packing, example_stats, load_examples, pack_examples, place, string_field
from lmjax.data.pipeline import Batch, pack_documents
from lmjax.data.tokenizer import Tokenizer, get_tokenizer


@dataclass(frozen=True)
class Pair:
    name: str  # "file:LINE", the file relative to the folder holding all files of its set
    input: str
    target: str

    @property
    def texts(self) -> tuple[str, str]:
        return self.input, self.target


def _expected(settings: Seq2SeqConfig) -> str:
    keys = " and ".join(f"'{key}' (seq2seq.{setting})" for key, setting in ((settings.input_key, "input_key"), (settings.target_key, "target_key")))
    return f"a JSON object with string fields {keys}"


def load_pairs(cfg: Config) -> ExampleSet[Pair]:
    """Training pairs of `data.paths` (at most `data.max_documents`) and the validation pairs."""
    settings = cfg.seq2seq
    expected = _expected(settings)

    def parse(record: dict, where: str, name: str) -> Pair:
        source = string_field(record, settings.input_key, "seq2seq.input_key", where, expected)
        target = string_field(record, settings.target_key, "seq2seq.target_key", where, expected, non_empty=True)
        return Pair(name, source, target)

    return load_examples(cfg, expected, parse, split_text=lambda pair: pair.input)


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
        object.__setattr__(self, "packing", pack_examples(lengths, (self.seq_len, self.target_len), self.pack, self.overlong))

    @property
    def num_examples(self) -> int:
        return len(self.input_offsets) - 1

    num_pairs = num_examples

    @property
    def num_tokens(self) -> int:
        """Input plus target tokens of all pairs, eos included, before truncation or dropping."""
        return int(self.inputs.shape[0] + self.targets.shape[0])

    @property
    def num_rows(self) -> int:
        return self.packing.num_rows

    @property
    def overlong_counts(self) -> dict[str, int]:
        return {"truncated": self.packing.truncated, "dropped": self.packing.dropped}

    def rows(self, row_indices: np.ndarray, pad_id: int) -> Batch:
        """The batch made of rows `row_indices` (see the module docstring for the fields)."""
        p = self.packing
        pairs, row_of_pair = p.examples_of(row_indices)
        n_rows = len(row_indices)
        common = dict(examples=pairs, row_of_example=row_of_pair, n_rows=n_rows, keep_last=True)
        enc = place([self.inputs], [pad_id], self.input_offsets, kept=p.kept[0, pairs], width=self.seq_len, **common)
        targets, segments, positions = place(
            [self.targets], [pad_id], self.target_offsets, kept=p.kept[1, pairs], width=self.target_len, **common
        )
        shifted = np.concatenate([np.full((n_rows, 1), pad_id, np.int32), targets[:, :-1]], axis=1)
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


def _tokenized_pairs(cfg: Config, tokenizer: Tokenizer, corpus: ExampleSet[Pair]) -> dict[str, list[np.ndarray]]:
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


def build_pair_data(cfg: Config) -> ExampleData:
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
    # Encoder and decoder positions of a row are the trainer's tokens per row (Task.tokens_per_row).
    stats = example_stats(cfg, train, val, tokens_per_row=seq_len + s.target_len)
    return ExampleData(
        tokenizer=tokenizer, fingerprint=corpus.fingerprint, stats=stats, train=train, validation=val, seq_len=seq_len,
        global_batch_size=cfg.data.global_batch_size, seed=data_seed(cfg), layout=Seq2SeqRows(s), empty_validation=empty,
    )

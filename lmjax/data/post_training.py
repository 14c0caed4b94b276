"""Rows of SFT chats (`train.objective: sft`) and DPO preference pairs (`dpo`) for decoder LMs.

Each example is rendered by the chat template (lmjax/data/chat.py) into token ids and weights
(1 on the assistant's tokens). As in the causal layout, a sequence s of n tokens fills n - 1 row
positions: inputs s[:-1], targets s[1:], `loss_mask` the targets' weights, so only response tokens
are learned and the prompt is only read. Examples are packed with lmjax/data/examples.py: several
per row with their own segment ids (attention never crosses them) and positions from 0, or one per
row (`pack: false`); over-long ones keep their first tokens (`overlong: truncate`, the response is
cut) or are dropped (`drop`), counted in `Data.stats["overlong"]`. An example whose prompt alone
fills the row would train on nothing: with `truncate` that is an error naming file, line and key.

A DPO row pair: `chosen_*` and `rejected_*` rows hold the same preference pairs, pair k with
segment id k + 1 in both, prompt + chosen response in one and prompt + rejected in the other; the
DPO task sums each pair's response log-probabilities by segment. With a precomputed reference
(`dpo.reference: precomputed`) the rows also carry `reference_chosen` / `reference_rejected`
[rows, seq_len]: column k holds the reference log-probability of the pair with segment id k + 1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from lmjax.config import Config, data_seed
from lmjax.data.chat import Chat, ChatTemplate, Preference, parse_chat, parse_preference, preference_expected, sft_expected
from lmjax.data.corpus import DataError
from lmjax.data.examples import ExampleData, ExampleSet, Packing, example_stats, load_examples, pack_examples, place
from lmjax.data.pipeline import Batch
from lmjax.data.tokenizer import get_tokenizer


@dataclass(frozen=True)
class Sequences:
    """Examples as causal sequences: example i is `inputs/targets/weights[offsets[i]:offsets[i + 1]]`."""

    inputs: np.ndarray  # [n_tokens] int32
    targets: np.ndarray  # [n_tokens] int32
    weights: np.ndarray  # [n_tokens] float32: 1 where the target is a response token
    offsets: np.ndarray  # [n_examples + 1] int64

    @classmethod
    def build(cls, sequences: list[tuple[np.ndarray, np.ndarray]]) -> Sequences:
        lengths = np.asarray([len(ids) - 1 for ids, _ in sequences], np.int64)
        join = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)  # noqa: E731
        return cls(
            inputs=join([ids[:-1] for ids, _ in sequences], np.int32),
            targets=join([ids[1:] for ids, _ in sequences], np.int32),
            weights=join([w[1:] for _, w in sequences], np.float32),
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        )

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def first_trained(self) -> np.ndarray:
        """Per example, the row position of its first response target (what a row must reach)."""
        trained = np.flatnonzero(self.weights > 0)
        example = np.searchsorted(self.offsets, trained, side="right") - 1
        first = np.full(len(self.offsets) - 1, np.iinfo(np.int64).max, np.int64)
        np.minimum.at(first, example, trained - self.offsets[example])
        return first

    def rows(self, packing: Packing, stream: int, examples: np.ndarray, row_of_example: np.ndarray, n_rows: int, width: int,
             pad_id: int, prefix: str = "") -> Batch:
        """The causal batch fields (`tokens`, `targets`, `loss_mask`, `segment_ids`, `positions`)."""
        tokens, targets, mask, segments, positions = place(
            [self.inputs, self.targets, self.weights], [pad_id, pad_id, 0.0], self.offsets, examples,
            packing.kept[stream, examples], row_of_example, n_rows, width, keep_last=False,
        )
        fields = {"tokens": tokens, "targets": targets, "loss_mask": mask, "segment_ids": segments, "positions": positions}
        return {prefix + key: value for key, value in fields.items()}


@dataclass(frozen=True)
class SFTSplit:
    sequences: Sequences
    seq_len: int
    pack: bool = True
    overlong: str = "truncate"
    packing: Packing = field(init=False, repr=False)

    def __post_init__(self) -> None:
        packing = pack_examples([self.sequences.lengths], [self.seq_len], self.pack, self.overlong)
        object.__setattr__(self, "packing", packing)

    num_examples = property(lambda self: len(self.sequences.offsets) - 1)
    num_tokens = property(lambda self: int(self.sequences.lengths.sum() + self.num_examples))  # + each sequence's first token
    num_rows = property(lambda self: self.packing.num_rows)
    overlong_counts = property(lambda self: {"truncated": self.packing.truncated, "dropped": self.packing.dropped})

    def rows(self, row_indices: np.ndarray, pad_id: int) -> Batch:
        examples, row_of_example = self.packing.examples_of(row_indices)
        return self.sequences.rows(self.packing, 0, examples, row_of_example, len(row_indices), self.seq_len, pad_id)


@dataclass(frozen=True)
class PreferenceSplit:
    chosen: Sequences
    rejected: Sequences
    seq_len: int
    pack: bool = True
    overlong: str = "truncate"
    reference: np.ndarray | None = None  # [n_pairs, 2] float32: the reference's (chosen, rejected) log-probabilities
    packing: Packing = field(init=False, repr=False)

    def __post_init__(self) -> None:
        lengths = [self.chosen.lengths, self.rejected.lengths]
        object.__setattr__(self, "packing", pack_examples(lengths, [self.seq_len] * 2, self.pack, self.overlong))

    num_examples = property(lambda self: len(self.chosen.offsets) - 1)
    num_tokens = property(lambda self: int(self.chosen.lengths.sum() + self.rejected.lengths.sum() + 2 * self.num_examples))
    num_rows = property(lambda self: self.packing.num_rows)
    overlong_counts = property(lambda self: {"truncated": self.packing.truncated, "dropped": self.packing.dropped})

    def with_reference(self, reference: np.ndarray) -> PreferenceSplit:
        return dataclasses.replace(self, reference=np.asarray(reference, np.float32))

    def rows(self, row_indices: np.ndarray, pad_id: int) -> Batch:
        examples, row_of_example = self.packing.examples_of(row_indices)
        n_rows = len(row_indices)
        args = (examples, row_of_example, n_rows, self.seq_len, pad_id)
        batch = {**self.chosen.rows(self.packing, 0, *args, prefix="chosen_"), **self.rejected.rows(self.packing, 1, *args, prefix="rejected_")}
        if self.reference is not None:
            counts = np.bincount(row_of_example, minlength=n_rows)
            slot = np.arange(len(examples)) - np.repeat(np.cumsum(counts) - counts, counts)  # segment id - 1
            for i, side in enumerate(("chosen", "rejected")):
                values = np.zeros((n_rows, self.seq_len), np.float32)
                values[row_of_example, slot] = self.reference[examples, i]
                batch[f"reference_{side}"] = values
        return batch

    def pair_slots(self, row_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(pair index, batch row, segment id - 1) of every pair in rows `row_indices`."""
        examples, row_of_example = self.packing.examples_of(row_indices)
        counts = np.bincount(row_of_example, minlength=len(row_indices))
        return examples, row_of_example, np.arange(len(examples)) - np.repeat(np.cumsum(counts) - counts, counts)


class ExampleRows:
    """The row layout of packed examples (`pipeline.RowLayout`): the packing lives in each split
    (made for data.seq_len by the build function, which gives `Data` the same seq_len); rows draw
    no random numbers, so `key` is unused."""

    def __init__(self, name: str, settings: dict[str, Any]):
        self.name, self.settings = name, settings

    def identity(self) -> dict[str, Any]:
        return {"rows": self.name, **self.settings}

    def num_rows(self, split, seq_len: int) -> int:
        return split.num_rows

    def batch(self, split, global_rows, host_rows, seq_len, pad_id, key) -> Batch:
        return split.rows(np.asarray(global_rows)[host_rows], pad_id)


def example_rows(cfg: Config, section: str) -> ExampleRows:
    """The row layout of `train.objective`'s examples, identified by its section's and the chat settings."""
    settings = {f"{name}.{k}": v for name in (section, "chat") for k, v in dataclasses.asdict(getattr(cfg, name)).items()}
    return ExampleRows(cfg.train.objective, settings)


def _check_prompts(examples: list, sequences: list[Sequences], seq_len: int, overlong: str, setting: str,
                   key: Callable[[Any], str]) -> None:
    """With `truncate`, an example whose first response token lies beyond the row is an error."""
    if overlong != "truncate":
        return
    for split_examples, split in zip(examples, sequences):
        first = split.first_trained()
        for i in np.flatnonzero(first >= seq_len)[:1]:
            example = split_examples[i]
            raise DataError(
                f"{example.where}: key '{key(example)}' has a prompt of {first[i] + 1} tokens (chat markers included) and the row "
                f"holds data.seq_len={seq_len}: no response token would be trained; shorten it, raise data.seq_len or set {setting}=drop"
            )


def _finish(cfg: Config, corpus: ExampleSet, tokenizer, train, val, what: str, section: str, tokens_per_row: int) -> ExampleData:
    setting = f"{section}.overlong"
    too_long = lambda s: f"all {s.num_examples} {what} are longer than a row (data.seq_len {cfg.data.seq_len}) and {setting}=drop drops them"  # noqa: E731
    if train.num_rows == 0:
        why = too_long(train) if train.num_examples else f"all {val.num_examples} {what} are in validation; lower data.val_fraction"
        raise DataError(f"{what} {corpus.fingerprint}: no training rows: {why}")
    if val.num_examples == 0:
        empty = f"no prompt hashed into data.val_fraction ({cfg.data.val_fraction}); raise it or give data.val_paths"
    else:
        empty = f"{'data.val_paths' if corpus.val_from_files else 'validation'}: {too_long(val)}"
    return ExampleData(
        tokenizer=tokenizer, fingerprint=corpus.fingerprint, stats=example_stats(cfg, train, val, tokens_per_row),
        train=train, validation=val, seq_len=cfg.data.seq_len, global_batch_size=cfg.data.global_batch_size, seed=data_seed(cfg),
        layout=example_rows(cfg, section), empty_validation=empty,
    )


def build_sft_data(cfg: Config) -> ExampleData:
    """JSONL chats -> tokenizer (the source run's with `train.init_from`) -> packed rows."""
    settings, seq_len = cfg.sft, cfg.data.seq_len
    corpus = load_examples(cfg, sft_expected(settings), lambda r, w, n: parse_chat(r, w, n, settings), lambda c: c.prompt)
    tokenizer = get_tokenizer(cfg, [content for chat in corpus.train for _, content in chat.messages], corpus.fingerprint)
    template = ChatTemplate(cfg.chat, tokenizer)

    def tokenize(chats: list[Chat]) -> Sequences:
        contents = tokenizer.encode_batch([content for chat in chats for _, content in chat.messages]) if chats else []
        starts = np.cumsum([0] + [len(chat.messages) for chat in chats])
        return Sequences.build([template.encode(list(chat.messages), contents[a:b]) for chat, a, b in zip(chats, starts, starts[1:])])

    sequences = [tokenize(corpus.train), tokenize(corpus.val)]
    _check_prompts([corpus.train, corpus.val], sequences, seq_len, settings.overlong, "sft.overlong", lambda chat: chat.key)
    train, val = (SFTSplit(s, seq_len, settings.pack, settings.overlong) for s in sequences)
    return _finish(cfg, corpus, tokenizer, train, val, "examples", "sft", seq_len)


def build_preference_data(cfg: Config) -> ExampleData:
    """JSONL preference pairs -> tokenizer -> packed chosen / rejected rows."""
    settings, seq_len = cfg.dpo, cfg.data.seq_len
    parse = lambda r, w, n: parse_preference(r, w, n, settings)  # noqa: E731
    corpus = load_examples(cfg, preference_expected(settings), parse, lambda pair: pair.prompt)
    tokenizer = get_tokenizer(cfg, [text for pair in corpus.train for text in pair.texts], corpus.fingerprint)
    template = ChatTemplate(cfg.chat, tokenizer)

    def tokenize(pairs: list[Preference]) -> tuple[Sequences, Sequences]:
        sides = []
        for side in ("chosen", "rejected"):
            messages = [[("user", pair.prompt), ("assistant", getattr(pair, side))] for pair in pairs]
            sides.append(Sequences.build([template.encode(m) for m in messages]))
        return sides[0], sides[1]

    train_sides, val_sides = tokenize(corpus.train), tokenize(corpus.val)
    key = lambda pair: settings.prompt_key  # noqa: E731
    _check_prompts([corpus.train, corpus.val], [train_sides[0], val_sides[0]], seq_len, settings.overlong, "dpo.overlong", key)
    train, val = (PreferenceSplit(*sides, seq_len, settings.pack, settings.overlong) for sides in (train_sides, val_sides))
    # A row pair (chosen and rejected rows) is two rows of tokens for the trainer's throughput.
    return _finish(cfg, corpus, tokenizer, train, val, "pairs", "dpo", 2 * seq_len)

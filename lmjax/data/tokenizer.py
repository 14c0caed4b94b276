"""SentencePiece tokenizer: trained on the corpus, cached by content, exact on source code.

Training settings are chosen so that any text, source code included, decodes back to itself:
no normalisation, spaces and newlines kept, no dummy prefix space, and byte fallback for
characters outside the vocabulary (the one exception: a literal U+2581 '▁' decodes as a space).
Ids are fixed: pad 0, unk 1, bos 2, eos 3, then `special_tokens`, then the `sentinels` T5's span
corruption replaces spans with (`<extra_id_0>`, ...; none by default).

`Tokenizer.token_bytes` gives the UTF-8 bytes each token stands for, so losses convert to bits
per byte, a unit that does not change with the vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from lmjax.config import Config
from lmjax.data.cache import cache_key, cached_folder
from lmjax.data.corpus import DataError, load_corpus

logger = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SENTENCE_CHARS = 2048  # training sentences are chunks of whole lines up to this length
MODEL_FILE = "tokenizer.model"
SENTINEL_FORMAT = "<extra_id_{}>"  # T5's sentinel pieces (lmjax/data/span_corruption.py)


class TokenizerError(DataError):
    """A tokenizer that cannot be trained, loaded or used with this model."""


def sentinel_tokens(count: int) -> list[str]:
    """T5's sentinel pieces `<extra_id_0>` ... `<extra_id_{count - 1}>`. Here rather than in
    span_corruption.py (which imports this module) because training reserves them."""
    return [SENTINEL_FORMAT.format(i) for i in range(count)]


def _trainer_options(vocab_size: int, model_type: str, special_tokens: Sequence[str]) -> dict:
    return dict(
        model_type=model_type,
        vocab_size=vocab_size,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        user_defined_symbols=list(special_tokens),
        byte_fallback=True,  # every text encodes: characters outside the vocab become UTF-8 bytes
        character_coverage=0.9999,  # rare characters go to bytes instead of taking vocab slots
        # Exact round trip: no normalisation, no collapsing of spaces, no space added in front.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        # Runs of spaces (indentation) may become one piece: 3.3 instead of 2.1 chars/token on code.
        split_by_whitespace=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=4 * SENTENCE_CHARS,  # bytes; a UTF-8 character is at most 4
        # The sentences are chosen here (see training_sentences), so training is deterministic.
        input_sentence_size=0,
        shuffle_input_sentence=False,
        hard_vocab_limit=False,  # a small corpus may give fewer pieces than asked; that is fine
        # Unigram only: prune faster with fewer EM rounds. On the built-in corpus (20M chars,
        # vocab 4096, 2 cores) training drops from 400 s to 60 s at the same chars/token (3.30).
        shrinking_factor=0.5,
        num_sub_iterations=1,
        num_threads=2,
        minloglevel=2,
    )


def _line_chunks(text: str) -> Iterator[str]:
    """Consecutive whole lines joined into chunks of at most SENTENCE_CHARS (longer lines cut)."""
    chunk = ""
    for line in text.splitlines(keepends=True):
        if len(chunk) + len(line) > SENTENCE_CHARS and chunk:
            yield chunk
            chunk = ""
        while len(line) > SENTENCE_CHARS:
            yield line[:SENTENCE_CHARS]
            line = line[SENTENCE_CHARS:]
        chunk += line
    if chunk:
        yield chunk


def training_sentences(documents: Sequence[str], train_chars: int) -> Iterator[str]:
    """Line chunks of `documents`, at most `train_chars` characters in all.

    Documents are visited in the order of their content hash, so a budget smaller than the corpus
    takes a fixed pseudo-random sample, not the alphabetically first files.
    """
    budget = train_chars
    for text in sorted(documents, key=lambda t: hashlib.sha1(t.encode("utf-8")).digest()):
        for chunk in _line_chunks(text):
            yield chunk[:budget]
            budget -= len(chunk)
            if budget <= 0:
                return


def train_tokenizer(
    documents: Sequence[str],
    vocab_size: int,
    model_type: str,
    special_tokens: Sequence[str],
    train_chars: int,
    out_prefix: str | Path,
) -> Path:
    """Trains a sentencepiece model on `documents`; returns the path of `{out_prefix}.model`."""
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=training_sentences(documents, train_chars),
            model_prefix=str(out_prefix),
            **_trainer_options(vocab_size, model_type, special_tokens),
        )
    except RuntimeError as e:
        raise TokenizerError(
            f"training the {model_type} tokenizer (vocab_size {vocab_size}) failed: {str(e).strip()}; "
            f"the vocab must hold 4 control ids, the special tokens and sentinels, 256 byte pieces and the corpus's characters"
        ) from None
    return Path(f"{out_prefix}.model")


def _token_bytes(sp: spm.SentencePieceProcessor) -> np.ndarray:
    sizes = np.zeros(sp.get_piece_size(), dtype=np.int32)
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue  # stands for no text
        if sp.is_byte(i):
            sizes[i] = 1
        else:
            sizes[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return sizes


class Tokenizer:
    """A sentencepiece model with the ids and per-token byte counts the trainer needs."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size: int = self._sp.get_piece_size()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        if self.eos_id < 0:
            raise TokenizerError(f"tokenizer {self.path} has no end-of-sequence token; documents are packed with eos")
        # Padding is always masked out of the loss, so a model without a pad id pads with eos.
        self.pad_id: int = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
        self.token_bytes: np.ndarray = _token_bytes(self._sp)  # [vocab_size] int32

    def piece(self, token_id: int) -> str:
        """The vocabulary entry of `token_id` ('\u2581' stands for a space, '<0x0A>' for a byte)."""
        return self._sp.id_to_piece(int(token_id))

    def piece_id(self, piece: str) -> int | None:
        """The id of a whole vocabulary entry (e.g. a special token such as '<mask>'), None if absent."""
        token_id = self._sp.piece_to_id(piece)
        return None if self._sp.is_unknown(token_id) and piece != self.piece(token_id) else token_id

    def control_ids(self) -> list[int]:
        """Ids that stand for no text: pad, unk, bos, eos (and unused pieces)."""
        sp = self._sp
        return [i for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)]

    def is_byte(self, token_id: int) -> bool:
        return self._sp.is_byte(int(token_id))

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes many texts at once on all cores available to this process."""
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # macOS has no affinity
        return self._sp.encode(list(texts), num_threads=threads or 1)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path).expanduser()
    if not path.is_file():
        raise TokenizerError(f"tokenizer file {path} not found (data.tokenizer.path); expected a sentencepiece .model file")
    try:
        return Tokenizer(path)
    except (RuntimeError, OSError) as e:
        raise TokenizerError(f"tokenizer file {path} is not a sentencepiece model ({str(e).strip()[:120]})") from None


def _trained_or_cached(cfg: Config, documents: Sequence[str], fingerprint: str) -> tuple[Tokenizer, bool]:
    """(tokenizer, whether it was trained now) for the config's settings on this corpus."""
    settings = cfg.data.tokenizer
    # Sentinels go after the special tokens; with none, options (and so cache keys) are as before.
    symbols = tuple(settings.special_tokens) + tuple(sentinel_tokens(settings.sentinels))
    options = _trainer_options(cfg.model.vocab_size, settings.model_type, symbols)
    key = cache_key(
        fingerprint=fingerprint,
        val_fraction=cfg.data.val_fraction,  # which documents are the training split
        train_chars=settings.train_chars,
        options=options,
        sentence_chars=SENTENCE_CHARS,
        sentencepiece=spm.__version__,
    )

    def build(folder: Path) -> None:
        logger.info("training a %s tokenizer, vocab %d, on corpus %s", settings.model_type, cfg.model.vocab_size, fingerprint)
        start = time.perf_counter()
        train_tokenizer(
            documents,
            cfg.model.vocab_size,
            settings.model_type,
            symbols,
            settings.train_chars,
            out_prefix=folder / Path(MODEL_FILE).stem,
        )
        meta = {"fingerprint": fingerprint, "train_seconds": round(time.perf_counter() - start, 2), "options": options}
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))

    folder, built = cached_folder(cfg.data.cache_dir, "tokenizers", key, build)
    return load_tokenizer(folder / MODEL_FILE), built


def get_tokenizer(cfg: Config, documents: Sequence[str], fingerprint: str) -> Tokenizer:
    """`data.tokenizer.path` if set, else one trained on `documents` (the training split of the
    corpus named `fingerprint`) with vocab `model.vocab_size`, reused from the cache when present."""
    if cfg.data.tokenizer.path:
        tokenizer = load_tokenizer(cfg.data.tokenizer.path)
    else:
        tokenizer, _ = _trained_or_cached(cfg, documents, fingerprint)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise TokenizerError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but model.vocab_size is "
            f"{cfg.model.vocab_size}; set model.vocab_size >= {tokenizer.vocab_size}"
        )
    return tokenizer


def tokenizer_train_command(cfg: Config) -> Path:
    """`lmjax tokenizer train`: trains (or finds cached) the config's tokenizer and prints its stats."""
    corpus = load_corpus(cfg.data)
    train, val = corpus.split(cfg.data.val_fraction)
    start = time.perf_counter()
    if cfg.data.tokenizer.path:
        tokenizer, built = get_tokenizer(cfg, [], corpus.fingerprint), False
    else:
        tokenizer, built = _trained_or_cached(cfg, [d.text for d in train], corpus.fingerprint)
    seconds = time.perf_counter() - start
    measured, label = (val, "validation") if val else (train, "training")
    texts = [d.text for d in measured]
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    n_chars = sum(len(t) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    print(f"tokenizer: {tokenizer.path}")
    print(f"  {'trained in' if built else 'loaded in'} {seconds:.1f}s; vocab {tokenizer.vocab_size}; corpus {corpus.fingerprint} ({len(train)} training documents)")
    print(f"  {label} documents: {len(measured)}, {n_tokens} tokens, {n_chars / n_tokens:.2f} chars/token, {n_bytes / n_tokens:.2f} bytes/token")
    return tokenizer.path

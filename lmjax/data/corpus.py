"""Documents to train on: the built-in corpus (the Python standard library) or the user's files.

A `Corpus` is a list of documents in a stable order, a fingerprint naming exactly which documents
with which content, and the number of files or records skipped by reason. The validation split
is decided per document by a hash of its content: it does not depend on the seed, never shares a
document text with training, and a document keeps its split when others are added or removed.
With `data.val_paths`, those files are the validation split instead and every document of
`data.paths` trains: a held-out set fixed by the user (another source, a later date) measures what
a hashed sample of the training distribution cannot. A file in both sets is an error.

User data (`data.paths`, paths or globs): any text file is one document; `.jsonl` / `.json` files
are JSON lines, one document per record in the field `data.text_key`. Binary files (a NUL byte),
text that is not UTF-8 and empty documents are skipped and counted. A JSONL line that is not a
JSON object holding a string `text_key` is an error naming the file and line: a malformed data
file is a bug to fix, not noise to drop silently.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmjax.config import DataConfig
from lmjax.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".json")
_EXCLUDED_STDLIB_DIRS = {"site-packages", "dist-packages"}
_GLOB_CHARS = set("*?[")


class DataError(UserError):
    """Data that cannot be used: a missing file, no usable documents, a malformed record."""


@dataclass(frozen=True)
class Document:
    name: str  # file name relative to the corpus root; "name:LINE" for a JSONL record
    text: str


@dataclass(frozen=True)
class Corpus:
    documents: list[Document]
    fingerprint: str
    skipped: dict[str, int]  # reason ("binary", "not_utf8", "empty") -> count, over both sets of files
    # The documents of data.val_paths; None: validation is chosen from `documents` by content hash.
    val_documents: list[Document] | None = None

    def split(self, val_fraction: float) -> tuple[list[Document], list[Document]]:
        """(train, validation) documents, each in corpus order; `val_fraction` is unused when the
        corpus has validation files."""
        if self.val_documents is not None:
            return list(self.documents), list(self.val_documents)
        train, val = [], []
        for doc in self.documents:
            (val if is_validation(doc.text, val_fraction) else train).append(doc)
        return train, val


def is_validation(text: str, val_fraction: float) -> bool:
    """Whether a document belongs to validation: its content hash, read as a fraction in [0, 1)."""
    digest = hashlib.sha1(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def builtin_corpus_files() -> tuple[Path, list[Path]]:
    """(stdlib root, sorted `*.py` files of the running interpreter's standard library)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):  # like rglob: symlinked folders are not followed
        # Prune excluded folders instead of walking them (site-packages can be large): every run
        # lists the corpus before it finds its cached tokens.
        subfolders[:] = [d for d in subfolders if d not in _EXCLUDED_STDLIB_DIRS]
        files += [Path(folder, n) for n in names if n.endswith(".py") and os.path.isfile(os.path.join(folder, n))]
    if not files:
        raise DataError(f"built-in corpus: no *.py files under the standard library at {root}; set data.paths")
    return root, sorted(files)


def resolve_paths(patterns: tuple[str, ...] | list[str], key: str = "data.paths") -> list[Path]:
    """Sorted unique files named by `patterns` (paths or globs, `~` expanded, `**` recursive);
    `key` is the config key that errors name."""
    files: set[Path] = set()
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if _GLOB_CHARS & set(expanded):
            matches = [Path(m) for m in glob.glob(expanded, recursive=True) if os.path.isfile(m)]
            if not matches:
                raise DataError(f"{key}: the glob '{pattern}' matches no files")
            files.update(m.resolve() for m in matches)
        elif os.path.isdir(expanded):
            raise DataError(f"{key}: '{pattern}' is a directory; give files or a glob such as '{pattern}/**/*.txt'")
        elif not os.path.isfile(expanded):
            raise DataError(f"{key}: file '{pattern}' not found")
        else:
            files.add(Path(expanded).resolve())
    return sorted(files)


def _decode(data: bytes) -> tuple[str | None, str | None]:
    """(text, None) for a usable document, else (None, reason skipped)."""
    if b"\0" in data:
        return None, "binary"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not_utf8"
    if not text.strip():
        return None, "empty"
    return text, None


def _jsonl_documents(path: Path, name: str, text_key: str) -> Iterator[tuple[Document | None, str | None]]:
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue  # blank separator lines are not records
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield None, "not_utf8"
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_number}: invalid JSON ({e.msg}); expected one JSON object per line") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                raise DataError(
                    f"{path}:{line_number}: expected a JSON object with a string field '{text_key}' "
                    f"(data.text_key); got {line.strip()[:80]!r}"
                )
            text = record[text_key]
            if "\0" in text:
                yield None, "binary"
            elif not text.strip():
                yield None, "empty"
            else:
                yield Document(f"{name}:{line_number}", text), None


def _read_documents(files: list[Path], root: Path, text_key: str) -> Iterator[tuple[Document | None, str | None]]:
    """(document, None) or (None, reason skipped) for each file or JSONL record, lazily, in order."""
    for path in files:
        name = path.relative_to(root).as_posix()
        if path.suffix.lower() in JSONL_SUFFIXES:
            yield from _jsonl_documents(path, name, text_key)
            continue
        text, reason = _decode(path.read_bytes())
        yield (Document(name, text), None) if text is not None else (None, reason)


def fingerprint_documents(documents: list[Document]) -> str:
    """Short hex digest of the documents' names and contents, in order."""
    digest = hashlib.sha256()
    for doc in documents:
        content = hashlib.sha256(doc.text.encode("utf-8")).hexdigest()
        digest.update(f"{doc.name}\0{content}\n".encode("utf-8"))
    return digest.hexdigest()[:16]


def with_validation_fingerprint(train: str, val: str | None) -> str:
    """The fingerprint of a training set plus, when given, separate validation files; `train`
    alone when `val` is None, so corpora without validation files keep their cache keys."""
    if val is None:
        return train
    return hashlib.sha256(f"train\0{train}\0val\0{val}\n".encode()).hexdigest()[:16]


def shared_root(files: list[Path]) -> Path:
    """The folder that document names are relative to: the deepest one holding all `files`."""
    return Path(os.path.commonpath([f.parent for f in files]))


def _read_corpus_files(files: list[Path], root: Path, text_key: str, limit: int | None, skipped: Counter) -> list[Document]:
    documents: list[Document] = []
    for doc, reason in _read_documents(files, root, text_key):
        if doc is None:
            skipped[reason] += 1
            continue
        documents.append(doc)
        if limit is not None and len(documents) >= limit:
            break  # stop reading: a capped corpus is for quick runs
    return documents


def _no_documents(source: str, skipped: Counter) -> DataError:
    found = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
    found = f"skipped: {found}" if found else "no records found"
    return DataError(f"{source}: no usable documents ({found}); expected UTF-8 text files or JSONL records")


def check_disjoint(train_files: list[Path], val_files: list[Path]) -> None:
    """A file in both data.paths and data.val_paths would be validated on what it trained on."""
    both = sorted(set(train_files) & set(val_files))
    if both:
        raise DataError(f"{both[0]} is in both data.paths and data.val_paths ({len(both)} such files); validation must not train")


def load_corpus(data: DataConfig) -> Corpus:
    """The documents of `data.paths` (or the built-in corpus), at most `data.max_documents`, and
    those of `data.val_paths` (all of them) when given."""
    if data.paths:
        files = resolve_paths(data.paths)
        root = shared_root(files)
        source = f"data.paths {list(data.paths)}"
    else:
        root, files = builtin_corpus_files()
        source = f"the built-in corpus ({root})"
    skipped: Counter[str] = Counter()
    documents = _read_corpus_files(files, root, data.text_key, data.max_documents, skipped)
    if not documents:
        raise _no_documents(source, skipped)
    val_documents, val_fingerprint = None, None
    if data.val_paths:
        val_files = resolve_paths(data.val_paths, key="data.val_paths")
        check_disjoint(files, val_files)
        val_skipped: Counter[str] = Counter()
        val_documents = _read_corpus_files(val_files, shared_root(val_files), data.text_key, None, val_skipped)
        if not val_documents:
            raise _no_documents(f"data.val_paths {list(data.val_paths)}", val_skipped)
        skipped += val_skipped
        val_fingerprint = fingerprint_documents(val_documents)
    fingerprint = with_validation_fingerprint(fingerprint_documents(documents), val_fingerprint)
    return Corpus(documents=documents, fingerprint=fingerprint, skipped=dict(skipped), val_documents=val_documents)

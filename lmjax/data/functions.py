"""An SFT set from the built-in corpus: each documented Python function of the standard library
becomes a record {"prompt": its signature and docstring, "response": its body}.

It needs no download and teaches a small model something checkable: write the function its
specification describes. Records are exact source: prompt + response is the function's own source
(decorators excluded) with the `def` line's indentation removed from every line, so methods read
like top-level functions and the concatenation always parses. A function that cannot be cut that
way (a line indented less than its `def`, e.g. a string literal continuing at column 0; code on the
docstring's last line) is skipped, as is one whose body is too short to teach anything or too long
for a row; every skip is counted by reason, and files that do not parse are counted too.

The split is by source file (a hash of its path, `corpus.is_validation`): functions of one file share
helpers, names and style, so splitting inside a file would leak. The order is deterministic: files
sorted, functions by their position in the file (a nested function after its parent).
"""

from __future__ import annotations

import ast
import io
import json
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lmjax.data.corpus import JSONL_SUFFIXES, DataError, builtin_corpus_files, is_validation
from lmjax.fileio import write_text_atomic

Record = dict[str, str]


@dataclass(frozen=True)
class ExtractOptions:
    min_response_chars: int = 10  # shorter bodies are `pass`, `...` or a bare `return x`: nothing to learn
    max_response_chars: int = 2000  # ~600 tokens: a response fits a row of a small seq2seq model
    max_response_lines: int = 40
    max_prompt_chars: int = 2000  # signature + docstring: some docstrings are whole manuals


def source_lines(text: str) -> list[str]:
    """`text`'s lines as Python counts them (ending in \\n, \\r\\n or \\r), ends kept. Not
    `str.splitlines`: it also splits at form feeds and other characters that end no source line."""
    return io.StringIO(text, newline="").readlines()


def _cut(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str], options: ExtractOptions) -> tuple[Record | None, str | None]:
    """(record, None) for a documented function, or (None, reason skipped)."""
    docstring, body = node.body[0], node.body[1:]
    if not body:
        return None, "no_body"
    if body[0].lineno <= docstring.end_lineno:
        return None, "code_on_docstring_line"  # no line boundary between prompt and response
    indent = lines[node.lineno - 1][: node.col_offset]  # col_offset counts bytes; indentation is ASCII
    if indent.strip():
        return None, "indentation"
    dedented = []
    for line in lines[node.lineno - 1 : node.end_lineno]:
        if line.startswith(indent):
            dedented.append(line[len(indent) :])
        elif not line.strip():
            dedented.append(line.lstrip(" \t"))  # a blank line shorter than the indentation: keep its line end
        else:
            return None, "indentation"
    split = docstring.end_lineno - node.lineno + 1
    prompt, response = "".join(dedented[:split]), "".join(dedented[split:])
    if len(response) < options.min_response_chars:
        return None, "too_short"
    if len(response) > options.max_response_chars or len(dedented) - split > options.max_response_lines:
        return None, "too_long"
    if len(prompt) > options.max_prompt_chars:
        return None, "prompt_too_long"
    return {"prompt": prompt, "response": response}, None


def function_records(text: str, source: str, options: ExtractOptions = ExtractOptions()) -> tuple[list[Record], Counter]:
    """Records of the documented functions (methods and nested ones included) of one file's source
    `text`, in file order, each with "source": "`source`:LINE"; and the skipped ones by reason.
    Raises SyntaxError or ValueError when `text` does not parse."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences and the like in old modules
        tree = ast.parse(text)
    lines = source_lines(text)
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    records, skipped = [], Counter()
    for node in sorted(functions, key=lambda n: (n.lineno, n.col_offset)):
        if ast.get_docstring(node, clean=False) is None:
            continue  # not a candidate: nothing specifies what to write
        record, reason = _cut(node, lines, options)
        if record is None:
            skipped[reason] += 1
        else:
            records.append({**record, "source": f"{source}:{node.lineno}"})
    return records, skipped


@dataclass
class Extraction:
    train: list[Record]
    val: list[Record]
    files: Counter  # "train", "val", "unparsable" -> count
    skipped: Counter  # reason -> functions skipped


def extract_corpus_functions(max_files: int | None, val_fraction: float, options: ExtractOptions = ExtractOptions()) -> Extraction:
    """Records of the first `max_files` built-in corpus files (all when None), split by file."""
    root, files = builtin_corpus_files()
    result = Extraction([], [], Counter(), Counter())
    for path in files[:max_files]:
        name = path.relative_to(root).as_posix()
        try:
            records, skipped = function_records(path.read_bytes().decode("utf-8"), name, options)
        except (UnicodeDecodeError, SyntaxError, ValueError):  # Python 2 test data, other encodings, NUL bytes
            result.files["unparsable"] += 1
            continue
        split = "val" if is_validation(name, val_fraction) else "train"
        result.files[split] += 1
        getattr(result, split).extend(records)
        result.skipped.update(skipped)
    return result


def validation_path(out: Path) -> Path:
    """Where the validation records go: `F.jsonl` -> `F.val.jsonl`, beside it."""
    return out.with_name(f"{out.stem}.val{out.suffix}")


def sft_from_corpus_command(out: str | Path, max_files: int | None, val_fraction: float, force: bool,
                            options: ExtractOptions = ExtractOptions()) -> Extraction:
    """`lmjax data sft-from-corpus`: writes the training records to `out` and the validation ones
    beside it (both atomically), refusing to overwrite unless `force`; prints the counts."""
    out = Path(out).expanduser()
    if out.suffix.lower() not in JSONL_SUFFIXES:
        raise DataError(f"--out {out}: expected a .jsonl file name (seq2seq training reads JSONL files by their suffix)")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if max_files is not None and max_files <= 0:
        raise DataError(f"--max-files must be > 0, got {max_files}")
    targets = (out, validation_path(out))
    existing = [str(p) for p in targets if p.exists()]
    if existing and not force:
        raise DataError(f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; pass --force to overwrite")
    result = extract_corpus_functions(max_files, val_fraction, options)
    if not result.train:
        raise DataError(f"no training records from {sum(result.files.values())} built-in corpus files; raise --max-files")
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, records in zip(targets, (result.train, result.val)):
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
    f = result.files
    print(f"files: {sum(f.values())} ({f['train']} train, {f['val']} val, {f['unparsable']} unparsable)")
    print(f"train: {len(result.train)} records -> {out}")
    print(f"val: {len(result.val)} records -> {targets[1]}")
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(result.skipped.items())) or "none"
    print(f"skipped functions: {skipped}")
    return result

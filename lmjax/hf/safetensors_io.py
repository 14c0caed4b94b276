"""The file layer of Hugging Face checkpoint import/export: safetensors weights, read and written
one tensor at a time, with one-line `CheckpointError`s naming the file or tensor at fault.

Only safetensors is read: pickled weights (`pytorch_model.bin`, `*.pt`, ...) are refused, never
loaded, because unpickling a downloaded file runs whatever code it carries.

What the `safetensors` library (0.8) does for us, checked when this was written:
- `safe_open(framework="numpy")` returns BF16 as `ml_dtypes.bfloat16` and `save_file` writes it.
- `safe_open` rejects a truncated file, trailing bytes or a corrupt header at open time (it
  checks that the data offsets cover the buffer exactly), so no size check of our own is needed.
- `save_file` does NOT: it copies `nbytes` from the array's data pointer, ignoring strides (a
  transposed view is written scrambled), and writes unsupported dtypes (e.g. complex) without
  complaint. `_prepare` makes arrays contiguous and checks dtypes before they reach it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, NoReturn

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from lmjax.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Weight files that are Python pickles: loading one executes code from the download.
PICKLE_PATTERNS = ("pytorch_model.bin", "pytorch_model-*.bin", "*.pt", "*.pth", "*.ckpt")

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_WRITABLE = set(DTYPES.values())


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


class SafetensorsCheckpoint:
    """The safetensors weights of a Hugging Face model directory: `model.safetensors`, or the shards
    listed in `model.safetensors.index.json` (its `weight_map`).

    Every file is opened (memory-mapped, header validated) up front, so a bad file fails at `open`
    and not halfway through an import; tensors are then read one at a time, from disk, on demand.
    """

    def __init__(self, directory: Path, handles: dict, where: dict[str, str]):
        self.directory = directory
        self._handles = handles  # file name -> open safe_open handle
        self._where = where  # tensor name -> file name

    @classmethod
    def open(cls, hf_dir: str | Path) -> "SafetensorsCheckpoint":
        d = Path(hf_dir)
        if not d.is_dir():
            raise CheckpointError(f"{d}: not a directory (expected a Hugging Face model directory)")
        index = d / INDEX_FILE
        # Same preference as transformers' from_pretrained: the single file wins over an index.
        if (d / SINGLE_FILE).is_file():
            listed, files = None, [SINGLE_FILE]
        elif index.is_file():
            listed = _read_index(index)
            files = sorted(set(listed.values()))
        else:
            _refuse_without_safetensors(d)
        handles: dict = {}
        try:
            for fname in files:
                path = d / fname
                if not path.is_file():
                    raise CheckpointError(f"{index}: lists shard file {fname!r}, which does not exist in {d}")
                try:
                    handles[fname] = safe_open(str(path), framework="numpy")
                except (SafetensorError, OSError) as e:
                    raise CheckpointError(f"{path}: truncated or not a safetensors file ({_one_line(e)})") from None
            where: dict[str, str] = {}
            for fname, handle in handles.items():
                for name in handle.keys():
                    if listed is not None and listed.get(name) != fname:
                        raise CheckpointError(
                            f"{d / fname}: holds tensor {name!r}, which {index.name} "
                            + (f"places in {listed[name]!r}" if name in listed else "does not list"))
                    where[name] = fname
            for name, fname in (listed or {}).items():
                if name not in where:
                    raise CheckpointError(f"{d / fname}: has no tensor {name!r}, which {index.name} places in it")
        except BaseException:
            for handle in handles.values():
                handle.__exit__(None, None, None)
            raise
        return cls(d, handles, where)

    def names(self) -> list[str]:
        """Every tensor name, sorted."""
        return sorted(self._where)

    def __contains__(self, name) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        """The file that holds tensor `name`."""
        return self.directory / self._file(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> np.dtype:
        """The stored dtype as numpy's (BF16 is `ml_dtypes.bfloat16`)."""
        stored = self._slice(name).get_dtype()
        if stored not in DTYPES:
            raise CheckpointError(f"{self.file_of(name)}: tensor {name!r} has dtype {stored}, "
                                  f"expected one of {', '.join(DTYPES)}")
        return DTYPES[stored]

    def read(self, name: str) -> np.ndarray:
        """The full tensor in its stored dtype, copied from the file (nothing is cached)."""
        self.dtype(name)  # refuse unsupported dtypes with our message, not the library's
        try:
            return self._handle(name).get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{self.file_of(name)}: cannot read tensor {name!r} ({_one_line(e)})") from None

    def check(self, expected: dict[str, tuple[int, ...]], optional: set[str] = frozenset()) -> None:
        """Raise naming the first problem (and how many more there are): first a tensor in
        `expected` but missing (unless in `optional`), then one in the files but not expected, then
        a wrong shape."""
        present = sorted(set(expected) & set(self._where))
        problems = [f"{self.directory}: missing tensor {n!r} (expected shape {tuple(expected[n])})"
                    for n in sorted(set(expected) - set(self._where) - set(optional))]
        problems += [f"{self.file_of(n)}: unexpected tensor {n!r} (not part of the model)"
                     for n in self.names() if n not in expected]
        problems += [f"{self.file_of(n)}: tensor {n!r} has shape {self.shape(n)}, expected {tuple(expected[n])}"
                     for n in present if self.shape(n) != tuple(expected[n])]
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise CheckpointError(problems[0] + more)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles = {}

    def __enter__(self) -> "SafetensorsCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _file(self, name: str) -> str:
        if name not in self._where:
            raise CheckpointError(f"{self.directory}: no tensor {name!r}")
        return self._where[name]

    def _handle(self, name: str):
        fname = self._file(name)
        if fname not in self._handles:
            raise CheckpointError(f"{self.directory}: checkpoint already closed, cannot read {name!r}")
        return self._handles[fname]

    def _slice(self, name: str):
        return self._handle(name).get_slice(name)


def _read_index(index: Path) -> dict[str, str]:
    """The index's weight_map, checked: tensor name -> shard file name in the same directory."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid index, expected JSON with a 'weight_map' "
                              f"({_one_line(e)})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: 'weight_map' must be a non-empty mapping of tensor name to file")
    for name, fname in weight_map.items():
        # A plain file name only: a downloaded index must not make us open files outside the directory.
        if not isinstance(fname, str) or Path(fname).name != fname or fname in ("", ".", ".."):
            raise CheckpointError(f"{index}: tensor {name!r} maps to {fname!r}, "
                                  "expected a file name in the same directory")
    return weight_map


def _model_class(d: Path) -> str:
    """The transformers class config.json names (the whole model, head included: `AutoModel` would
    save the base model without it), else the Auto class of causal LMs."""
    try:
        return json.loads((d / "config.json").read_text())["architectures"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return "AutoModelForCausalLM"


def _refuse_without_safetensors(d: Path) -> NoReturn:
    pickled = sorted({p.name for pattern in PICKLE_PATTERNS for p in d.glob(pattern)})
    if pickled:
        raise CheckpointError(
            f"{d}: holds only pickled weights ({', '.join(pickled)}); lmjax reads safetensors only, because "
            f"unpickling a downloaded file runs its code. If you trust the file, convert it once: python -c "
            f"\"import transformers as t; t.{_model_class(d)}.from_pretrained('{d}').save_pretrained('{d}-safetensors')\"")
    raise CheckpointError(f"{d}: no {SINGLE_FILE} or {INDEX_FILE}")


def _prepare(name, array) -> np.ndarray:
    """A C-contiguous little-endian array of a supported dtype (what save_file assumes unchecked)."""
    if not isinstance(name, str) or not name or name == "__metadata__":
        raise CheckpointError(f"cannot write tensor named {name!r}: expected a non-empty string")
    a = np.asarray(array)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype not in _WRITABLE:
        raise CheckpointError(f"cannot write tensor {name!r}: dtype {a.dtype} is not one of {', '.join(DTYPES)}")
    # Not np.ascontiguousarray: it turns a 0-d array into shape (1,).
    return a if a.flags.c_contiguous else a.copy(order="C")


def write_safetensors(out_dir: str | Path, tensors: Iterable[tuple[str, np.ndarray]],
                      max_shard_bytes: int = 2 * 1024**3, metadata: dict[str, str] | None = None) -> list[Path]:
    """Write `(name, array)` pairs as they come into shard files of at most `max_shard_bytes` of
    tensor data each (a larger tensor gets a shard of its own), named as transformers'
    save_pretrained names them: `model.safetensors` when one shard holds everything, else
    `model-00001-of-0000N.safetensors`, ... plus `model.safetensors.index.json`. Returns the paths
    written (shards, then the index if any).

    `metadata` defaults to {"format": "pt"}, which transformers requires to load the files. Only one
    shard's tensors are held at a time. Shards are written under temporary names and renamed once
    all are complete, so an interrupted write leaves no `*.safetensors`; a directory that already
    holds any is refused, so nothing saved is overwritten.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    existing = sorted(p.name for p in out.glob("*.safetensors*")) if out.is_dir() else []
    if existing:
        raise CheckpointError(f"{out}: already holds {', '.join(existing)}; refusing to overwrite saved weights")
    metadata = {"format": "pt"} if metadata is None else dict(metadata)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"safetensors metadata must map str to str, got {metadata!r}")
    out.mkdir(parents=True, exist_ok=True)

    temps: list[Path] = []  # finished shards under temporary names, in order
    shard: dict[str, np.ndarray] = {}
    shard_of: dict[str, int] = {}  # tensor name -> shard number (0-based)
    shard_bytes = total = 0

    def flush():
        # Hidden name without the .safetensors suffix: neither we nor transformers will pick it up.
        tmp = out / f".lmjax-shard-{len(temps):05d}-{os.getpid()}.tmp"
        temps.append(tmp)
        save_file(shard, str(tmp), metadata=metadata)
        shard.clear()

    try:
        for name, array in tensors:
            a = _prepare(name, array)
            if name in shard_of:
                raise CheckpointError(f"cannot write tensor {name!r} twice")
            if shard and shard_bytes + a.nbytes > max_shard_bytes:
                flush()
                shard_bytes = 0
            shard[name], shard_of[name] = a, len(temps)
            shard_bytes += a.nbytes
            total += a.nbytes
        if not shard_of:
            raise CheckpointError(f"{out}: no tensors to write")
        flush()
        n = len(temps)
        finals = [out / (SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors") for i in range(n)]
        if n > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: finals[i].name for k, i in shard_of.items()}}
            tmp_index = out / f".lmjax-index-{os.getpid()}.tmp"
            temps.append(tmp_index)
            tmp_index.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            finals.append(out / INDEX_FILE)
        # The index is renamed last: until it exists, a half-renamed set of shards is not a checkpoint.
        for tmp, final in zip(temps, finals):
            os.replace(tmp, final)
        return finals
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise

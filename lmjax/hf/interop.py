"""Hugging Face model directories <-> lmjax run directories.

    lmjax import-hf HF_DIR --out RUN_DIR [key=value ...]   # config.json + *.safetensors -> a run
    lmjax export-hf RUN_DIR --out HF_DIR [--step N] [--dtype D]

An imported run directory is what `lmjax train` writes, minus the training: `config.yaml` (the
model section read from config.json, the objective of its family), `checkpoints/0` holding the
parameters only, `tokenizer.model` when the Hugging Face directory has a sentencepiece model
(`tokenizer.model`, T5's `spiece.model`), and `imported.json` (source, architecture, dtype,
tokenizer or why there is none, the special token ids). `eval`, `generate`, `load_model`,
`export-hf` and `train.init_from` read it; `lmjax train` on it refuses (start a new run from it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lmjax.config import Config, build, parse_override, replace, set_path, to_dict
from lmjax.config_checks import validate
from lmjax.errors import CheckpointError
from lmjax.hf import convert
from lmjax.hf.configs import ARCHITECTURES, export_model_type, hf_config, model_section, model_type_of
from lmjax.hf.safetensors_io import SafetensorsCheckpoint, write_safetensors

IMPORTED = "imported.json"
SENTENCEPIECE_FILES = ("tokenizer.model", "spiece.model")
OBJECTIVES = {"dense": "causal_lm", "moe": "causal_lm", "encoder": "mlm", "t5": "seq2seq"}
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def is_hf_dir(path: str | Path) -> bool:
    """A Hugging Face model directory: config.json, and no lmjax config.yaml."""
    path = Path(path)
    return (path / "config.json").is_file() and not (path / "config.yaml").exists()


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{hf_dir} has no config.json; expected a Hugging Face model directory (config.json + *.safetensors)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}); expected a Hugging Face config") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def sentencepiece_file(hf_dir: Path) -> Path | None:
    return next((hf_dir / name for name in SENTENCEPIECE_FILES if (hf_dir / name).is_file()), None)


# (output head, token table) of the architectures whose head config.json may say is tied.
HEADS = {"llama": ("lm_head.weight", "model.embed_tokens.weight"), "gpt2": ("lm_head.weight", "transformer.wte.weight"),
         "bert": ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight")}
HEADS["mistral"] = HEADS["mixtral"] = HEADS["llama"]


def hf_model_section(hf_dir: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(model_type, config.json, lmjax's model section) of a Hugging Face directory.

    A head the files hold apart from the token table is untied, whatever config.json says:
    transformers 5 does not tie weights a checkpoint gives different values."""
    hf = read_hf_config(hf_dir)
    where = str(hf_dir / "config.json")
    model_type = model_type_of(hf, where)
    model = model_section(hf, where)
    if model.get("tie_embeddings") and model_type in HEADS:
        head, table = HEADS[model_type]
        with SafetensorsCheckpoint.open(hf_dir) as checkpoint:
            table = table if table in checkpoint else table.split(".", 1)[1]  # files saved without the base-model prefix
            if head in checkpoint and table in checkpoint and not np.array_equal(checkpoint.read(head), checkpoint.read(table)):
                model["tie_embeddings"] = False
    return model_type, hf, model


def hf_run_config(hf_dir: str | Path, overrides: list[str] | tuple[str, ...] = (), run_dir: Path | None = None) -> tuple[Config, str, dict]:
    """(the lmjax config of a Hugging Face directory, its model_type, its config.json). The
    tokenizer is the directory's sentencepiece model, when it has one."""
    hf_dir = Path(hf_dir).expanduser().absolute()
    model_type, hf, model = hf_model_section(hf_dir)
    tree = to_dict(build(Config, {}))
    tree["model"].update(model)
    tree["train"]["objective"] = OBJECTIVES[model["family"]]
    if model.get("style") in ("gpt2", "bert"):  # a learned position table bounds the rows
        tree["data"]["seq_len"] = min(tree["data"]["seq_len"], model["max_seq_len"])
    tokenizer = sentencepiece_file(hf_dir)
    tree["data"]["tokenizer"]["path"] = str(tokenizer) if tokenizer else None
    if run_dir is not None:
        tree["run_dir"] = str(run_dir)
    for text in overrides:  # the user's (mesh, dtype, ...) on top
        set_path(tree, *parse_override(text))
    cfg = build(Config, tree)
    validate(cfg)
    return cfg, model_type, hf


def load_hf_params(hf_dir: str | Path, cfg: Config, abstract_params: Any) -> Any:
    """The parameters of a Hugging Face directory on the shardings of `abstract_params`."""
    hf_dir = Path(hf_dir).expanduser().absolute()
    hf = read_hf_config(hf_dir)
    model_type = model_type_of(hf, str(hf_dir / "config.json"))
    checkpoint, plan = convert.open_checked(hf_dir, model_type, cfg.model, hf, abstract_params)
    with checkpoint:
        return convert.load_params(checkpoint, plan, abstract_params)


def import_hf(hf_dir: str | Path, out: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Writes the run directory `out` from the Hugging Face directory `hf_dir`; returns what
    `imported.json` records (architecture, parameters, dtypes, tokenizer, special token ids)."""
    from lmjax.config import save_config
    from lmjax.evaluate import reader_overrides
    from lmjax.train.checkpoint import Checkpointer
    from lmjax.train.step import ModelSetup

    hf_dir, out = Path(hf_dir).expanduser().absolute(), Path(out).expanduser().absolute()
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"--out {out} exists and is not empty; expected a new directory (nothing is overwritten)")
    cfg, model_type, hf = hf_run_config(hf_dir, overrides, out)  # what the run directory records

    def reading_setup(*extra: str) -> ModelSetup:  # on a mesh any device count holds, unless overridden
        return ModelSetup.build(hf_run_config(hf_dir, [*reader_overrides(jax.device_count()), *overrides, *extra], out)[0])

    abstract = reading_setup().factory.abstract().params
    checkpoint, plan = convert.open_checked(hf_dir, model_type, cfg.model, hf, abstract)
    is_main = jax.process_index() == 0
    with checkpoint:
        file_dtype, tensor_dtypes = convert.file_dtypes(checkpoint, plan)
        dtype = convert.source_dtype(checkpoint, plan)  # the files' precision: bfloat16 stays bfloat16
        if any(o.startswith("model.param_dtype=") for o in overrides):  # unless the user chose
            dtype = cfg.model.param_dtype
        cfg = replace(cfg, **{"model.param_dtype": dtype})
        tokenizer = sentencepiece_file(hf_dir)
        record = {
            "source": str(hf_dir), "model_type": model_type, "architecture": ARCHITECTURES[model_type], "dtype": dtype,
            "file_dtype": file_dtype, "tensor_dtypes": tensor_dtypes, "parameters": convert.parameter_count(abstract),
            "tokenizer": "tokenizer.model" if tokenizer else None,
            "tokenizer_note": f"sentencepiece model {tokenizer.name}" if tokenizer else
            f"{hf_dir} has no sentencepiece model ({' or '.join(SENTENCEPIECE_FILES)}); lmjax tokenizes with sentencepiece only, "
            "so eval, generate and training need token ids or another tokenizer",
            **{key: hf.get(key) for key in TOKEN_ID_KEYS if key in hf},
        }
        if is_main:  # the marker first: a directory an import left unfinished is never taken for a training run
            out.mkdir(parents=True, exist_ok=True)
            (out / IMPORTED).write_text(json.dumps({**record, "complete": False}, indent=2) + "\n")
        abstract = reading_setup(f"model.param_dtype={dtype}").factory.abstract().params
        params = convert.load_params(checkpoint, plan, abstract)
    if is_main:
        if tokenizer is not None:
            shutil.copyfile(tokenizer, out / "tokenizer.model")
            cfg = replace(cfg, **{"data.tokenizer.path": str(out / "tokenizer.model")})
        save_config(cfg, out / "config.yaml")
    checkpointer = Checkpointer(out / "checkpoints", keep=1)
    checkpointer.save(0, {"params": params}, {"imported_from": str(hf_dir)})
    checkpointer.wait()
    checkpointer.close()
    if is_main:
        (out / IMPORTED).write_text(json.dumps({**record, "complete": True}, indent=2) + "\n")
    return record


def imported_record(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / IMPORTED
    return json.loads(path.read_text()) if path.is_file() else None


def export_hf(run_dir: str | Path, out: str | Path, step: int | None = None, dtype: str | None = None,
              overrides: list[str] | tuple[str, ...] = (), max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Writes the Hugging Face directory `out` (config.json, safetensors, the sentencepiece model
    as tokenizer.model) from a run's checkpoint; returns `out`. The parameters are read onto all
    devices, replicated, whatever mesh the run trained on (`overrides` such as mesh.fsdp=-1
    mesh.data=1 shard them instead)."""
    from lmjax.evaluate import load_run, reader_overrides

    run_dir, out = Path(run_dir).expanduser().absolute(), Path(out).expanduser().absolute()
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"--out {out} exists and is not empty; expected a new directory (nothing is overwritten)")
    run = load_run(run_dir, [*reader_overrides(jax.device_count()), *overrides], step=step)
    model = run.cfg.model
    model_type = export_model_type(model)  # refuses before anything is written
    record, tensor_dtypes = imported_record(run_dir), {}
    if dtype is None and record is not None and "file_dtype" in record:  # an imported run goes back as it came
        dtype, tensor_dtypes = record["file_dtype"], record.get("tensor_dtypes", {})
    dtype = dtype or model.param_dtype
    if dtype not in convert.FLOAT_DTYPES:
        raise CheckpointError(f"--dtype {dtype}: expected one of {', '.join(convert.FLOAT_DTYPES)}")
    config = hf_config(model, dtype, _token_ids(run_dir, model_type))  # any refusal comes before a file is written
    tensors = convert.export_tensors(model_type, model, run.params, dtype, tensor_dtypes)
    if jax.process_index() != 0:
        for _ in tensors:  # every host takes part in the gathers; the first one writes
            pass
        return out
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out, tensors, max_shard_bytes=max_shard_bytes)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (run_dir / "tokenizer.model").is_file():
        shutil.copyfile(run_dir / "tokenizer.model", out / ("spiece.model" if model_type == "t5" else "tokenizer.model"))
    return out


def _token_ids(run_dir: Path, model_type: str) -> dict[str, int | None]:
    """Special token ids for config.json: the imported ones, else the run's tokenizer's."""
    record = imported_record(run_dir)
    if record is not None:
        return {key: record[key] for key in TOKEN_ID_KEYS if key in record}
    if not (run_dir / "tokenizer.model").is_file():
        return {}
    from lmjax.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(run_dir / "tokenizer.model")
    ids = {"bos_token_id": tokenizer.bos_id if tokenizer.bos_id >= 0 else None, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    if model_type == "t5":
        ids["decoder_start_token_id"] = tokenizer.pad_id
    return ids



"""`train.init_from`: the model a run starts from. When a config names a source (an lmjax run
directory or a Hugging Face model directory), its model section and tokenizer become the source's
before the config is built (`lmjax.config.load_config`), so the source's parameters always fit.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from lmjax.config import Config, ConfigError, ModelConfig, build, flatten_dotted, load_yaml, set_path, to_dict


# Model keys a run started from another (`train.init_from`) may change: how it computes, not what.
COMPUTE_ONLY_MODEL_KEYS = ("dtype", "param_dtype", "remat", "attention", "loss_chunk_tokens")


def _resolved(model: ModelConfig) -> dict[str, Any]:
    """The model's settings with every `auto`/None default replaced by what it means, flattened, so
    that `n_kv_heads: null` and `n_kv_heads: 4` (with 4 heads) compare equal."""
    resolved = dataclasses.replace(
        model, n_kv_heads=model.kv_heads, head_dim=model.head_size, positions=model.position_kind, feed_forward=model.ffn,
        decoder_layers=model.n_decoder_layers if model.family == "t5" else None,
        norm_position="post" if model.post_norm else "pre",
    )
    return flatten_dotted(to_dict(resolved))


def take_source_model(tree: dict) -> None:
    """`train.init_from: RUN_DIR`: the model section becomes the source run's, the tokenizer its
    tokenizer, and the path absolute. Model keys the config gives must mean what the source's do,
    except compute-only ones (another shape could not hold the source's parameters).

    A run's own saved config.yaml already holds all of it, so a run (eval, generate, resume) does not
    need its source once started: when the source is gone, a config whose model and tokenizer are
    given is taken as it is (the trainer still names a missing source before a new run starts)."""
    train_section = tree.get("train") or {}
    source = train_section.get("init_from")
    if not source:
        return
    source_dir = Path(str(source)).expanduser().absolute()
    settings = ((tree.get("data") or {}).get("tokenizer") or {})
    if (source_dir / "config.yaml").is_file():
        source_model = build(Config, load_yaml(source_dir / "config.yaml")).model
        tokenizer, no_tokenizer = source_dir / "tokenizer.model", f"train.init_from: {missing_tokenizer(source_dir)}"
    elif (source_dir / "config.json").is_file():  # a Hugging Face model directory
        from lmjax.hf.interop import SENTENCEPIECE_FILES, hf_model_section, sentencepiece_file

        source_model = build(ModelConfig, hf_model_section(source_dir)[2], "model.")
        tokenizer = sentencepiece_file(source_dir) or source_dir / SENTENCEPIECE_FILES[0]
        no_tokenizer = (f"train.init_from: {source_dir} has no sentencepiece model ({' or '.join(SENTENCEPIECE_FILES)}); "
                        "lmjax tokenizes its data with sentencepiece, so it cannot train this model on text")
    elif tree.get("model") and settings.get("path"):
        return
    else:
        raise ConfigError(f"train.init_from: {source_dir} is neither an lmjax run directory (config.yaml) nor a Hugging Face "
                          "model directory (config.json); expected a model to start from")
    theirs = _resolved(source_model)
    given = flatten_dotted(tree.get("model") or {})
    for key, value in given.items():
        changed = to_dict(source_model)
        set_path(changed, key, value)
        ours = _resolved(build(ModelConfig, changed, "model."))
        differing = sorted(k for k in ours if ours[k] != theirs[k] and k not in COMPUTE_ONLY_MODEL_KEYS)
        if differing:
            name = differing[0]
            raise ConfigError(
                f"model.{key}={value!r} differs from the train.init_from run {source_dir} (model.{name}: {theirs[name]!r}); "
                f"a run started from another keeps its model: remove model.{key} (only {', '.join(COMPUTE_ONLY_MODEL_KEYS)} may change)"
            )
    model = to_dict(source_model)
    for key in COMPUTE_ONLY_MODEL_KEYS:
        if key in given:
            model[key] = given[key]
    tree["model"] = model
    train_section["init_from"] = str(source_dir)
    if settings.get("path") and Path(str(settings["path"])).expanduser().resolve() != tokenizer.resolve():
        raise ConfigError(
            f"data.tokenizer.path={settings['path']} differs from the train.init_from run's tokenizer {tokenizer}; "
            "its parameters read that tokenizer's ids: remove data.tokenizer.path"
        )
    if not tokenizer.is_file():
        raise ConfigError(no_tokenizer)
    set_path(tree, "data.tokenizer.path", str(tokenizer))


def missing_tokenizer(run_dir: Path) -> str:
    """Why a run directory has no tokenizer.model (for the one-line errors of its readers)."""
    imported = Path(run_dir) / "imported.json"
    if imported.is_file():
        note = json.loads(imported.read_text()).get("tokenizer_note", "")
        return f"{run_dir} (imported by lmjax import-hf) has no tokenizer.model: {note}"
    return f"{run_dir} has no tokenizer.model; expected a run directory written by `lmjax train`"

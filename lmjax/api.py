"""`load_model`: any lmjax model, from a run directory or a Hugging Face model directory, for Python.

    from lmjax import load_model
    m = load_model("runs/x")                       # or a Hugging Face directory (config.json + *.safetensors)
    logits = m.logits(input_ids)                   # int [B, T] -> float32 [B, T, V]
    logits = m.logits(input_ids, decoder_input_ids=dec)   # T5
    logits = m.logits(ids, attention_mask=mask, token_type_ids=types)  # BERT-style

`input_ids` are the checkpoint's own tokenizer ids. `attention_mask` (1 = token, 0 = padding, as in
transformers) becomes lmjax's segment ids: padding is never attended to, so the logits of the real
tokens are those of the unpadded input (the logits at padded positions mean nothing). Parameters
are replicated on every device, whatever mesh a run trained on; `overrides` shard them (e.g.
`mesh.fsdp=-1 mesh.data=1` for a model larger than one device). Loading prints nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.config import Config
from lmjax.errors import UserError


@dataclass
class Model:
    config: Config
    params: Any
    module: Any  # the Flax module (`module.apply({"params": params}, ...)`)
    mesh: Any
    rules: tuple
    path: Path
    tokenizer_path: Path | None  # the sentencepiece model the ids come from, when there is one

    def __post_init__(self):
        self._forward = jax.jit(self._apply)

    def _apply(self, params, input_ids, decoder_input_ids, attention_mask, token_type_ids, decoder_attention_mask):
        family = self.config.model.family
        if family == "t5":
            return self.module.apply({"params": params}, input_ids, decoder_input_ids, encoder_segment_ids=attention_mask,
                                     decoder_segment_ids=decoder_attention_mask)
        if family == "encoder":
            return self.module.apply({"params": params}, input_ids, None, attention_mask, token_type_ids)
        return self.module.apply({"params": params}, input_ids, None, attention_mask)

    def logits(self, input_ids, decoder_input_ids=None, attention_mask=None, token_type_ids=None, decoder_attention_mask=None) -> jax.Array:
        """float32 logits [B, T, V] (T5: [B, decoder length, V])."""
        from lmjax import sharding

        family = self.config.model.family
        if (decoder_input_ids is None) != (family != "t5"):
            raise UserError("decoder_input_ids: required for a T5 model, and only for one" if family == "t5" else
                            f"decoder_input_ids: this {family} model has no decoder inputs")
        if token_type_ids is not None and family != "encoder":
            raise UserError(f"token_type_ids: only BERT-style encoders take them, this model is {family}")
        ids = _ints(input_ids, "input_ids")
        masks = [None if a is None else _ints(a, name, ids.shape if name != "decoder_attention_mask" else None)
                 for a, name in ((attention_mask, "attention_mask"), (token_type_ids, "token_type_ids"), (decoder_attention_mask, "decoder_attention_mask"))]
        decoder_ids = None if decoder_input_ids is None else _ints(decoder_input_ids, "decoder_input_ids")
        with sharding.activate(self.mesh, self.rules):
            return self._forward(self.params, ids, decoder_ids, *masks)


def _ints(array, name: str, shape: tuple[int, ...] | None = None) -> jax.Array:
    array = np.asarray(array)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise UserError(f"{name}: expected an integer array [batch, length], got {array.dtype} {array.shape}")
    if shape is not None and array.shape != shape:
        raise UserError(f"{name}: expected shape {shape} (as input_ids), got {array.shape}")
    return jnp.asarray(array, jnp.int32)


def load_model(path: str | Path, overrides: list[str] | tuple[str, ...] = (), step: int | None = None) -> Model:
    """The model of an lmjax run directory (its latest checkpoint, or `step`) or of a Hugging Face
    model directory (converted in memory, streamed onto the devices)."""
    from lmjax.evaluate import load_run, reader_overrides
    from lmjax.hf.interop import hf_run_config, is_hf_dir, load_hf_params, sentencepiece_file
    from lmjax.train.step import ModelSetup

    path = Path(path).expanduser().absolute()
    overrides = [*reader_overrides(jax.device_count()), *overrides]
    if is_hf_dir(path):
        if step is not None:
            raise UserError(f"step={step}: a Hugging Face directory has one set of weights, no steps")
        cfg, _, _ = hf_run_config(path, overrides)
        setup = ModelSetup.build(cfg)
        params = load_hf_params(path, cfg, setup.factory.abstract().params)
        tokenizer = sentencepiece_file(path)
    elif (path / "config.yaml").is_file():
        run = load_run(path, overrides, step=step)
        cfg, setup, params = run.cfg, run.setup, run.params
        tokenizer = path / "tokenizer.model" if (path / "tokenizer.model").is_file() else None
    else:
        raise UserError(f"{path}: neither an lmjax run directory (config.yaml) nor a Hugging Face model directory (config.json)")
    return Model(cfg, params, setup.model, setup.mesh, setup.rules, path, tokenizer)

"""`train.init_from: DIR`: a run that starts from the parameters of another lmjax run, or of a
Hugging Face model directory (read as `lmjax import-hf` reads it).

The source's latest checkpoint is read parameters only (not its optimizer state), straight onto
this run's shardings, so the source may have trained on another mesh or number of hosts. The run
itself starts fresh: step 0, a new optimizer state, its own data and schedule. Its model config
and tokenizer are the source's (`lmjax.config` fills them in when the config is loaded and refuses
shape changes), so the parameters always fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmjax.config import Config
from lmjax.errors import CheckpointError
from lmjax.train.checkpoint import Checkpointer
from lmjax.train.step import ModelSetup


def load_source_params(cfg: Config, setup: ModelSetup) -> tuple[Any, int]:
    """(parameters of the source run's latest checkpoint on this run's shardings, that step)."""
    source = Path(cfg.train.init_from).expanduser()
    from lmjax.hf.interop import is_hf_dir, load_hf_params

    if is_hf_dir(source):  # streamed from its safetensors onto this run's shardings; "step" 0
        return load_hf_params(source, cfg, setup.factory.abstract().params), 0
    if not (source / "checkpoints").is_dir():
        raise CheckpointError(f"train.init_from: {source} has no checkpoints/ folder; expected a trained lmjax run")
    checkpointer = Checkpointer(source / "checkpoints", keep=1, read_only=True)
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise CheckpointError(f"train.init_from: {source} has no checkpoint yet; train it first")
        return checkpointer.restore_params(step, setup.factory.abstract().params), step
    finally:
        checkpointer.close()

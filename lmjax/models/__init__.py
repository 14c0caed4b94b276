"""Model definitions. `build_model(cfg.model)` picks the Flax module for `cfg.model.family`."""

from __future__ import annotations

import flax.linen as nn

from lmjax.config import ConfigError, ModelConfig
from lmjax.models.decoder import DecoderLM, ModelInputError, init_cache, moe_aux_loss

_FAMILIES: dict[str, type[nn.Module]] = {"dense": DecoderLM, "moe": DecoderLM}  # moe: MoE FFN layers


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.family not in _FAMILIES:
        raise ConfigError(f"model.family: expected one of {', '.join(_FAMILIES)}, got {cfg.family!r}")
    return _FAMILIES[cfg.family](cfg)


__all__ = ["DecoderLM", "ModelInputError", "build_model", "init_cache", "moe_aux_loss"]

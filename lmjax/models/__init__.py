"""Model definitions. `build_model(cfg.model)` picks the Flax module for `cfg.model.family`.

Each family is one `ModelFamily`: its module and its own parameter and FLOP counts, so
`lmjax.flops` (MFU, summaries, sweep budgets) works for every family without knowing any.
A module also answers `example_inputs(batch, length)`, the arguments `init` is called with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import flax.linen as nn

from lmjax.config import ConfigError, ModelConfig
from lmjax.models import decoder, encoder
from lmjax.models.decoder import AUX_LOSS, AUX_METRICS, DecoderLM, ModelInputError, init_cache, moe_aux_loss
from lmjax.models.encoder import EncoderMLM


@dataclass(frozen=True)
class ModelFamily:
    module: type[nn.Module]
    param_counts: Callable[[ModelConfig], dict[str, int]]
    forward_terms: Callable[[ModelConfig, int], dict[str, float]]  # Chinchilla appendix-F terms of one sequence
    generates: bool  # decodes left to right with a KV cache (lmjax generate)


_DECODER = ModelFamily(DecoderLM, decoder.param_counts, decoder.forward_terms, generates=True)
FAMILIES: dict[str, ModelFamily] = {
    "dense": _DECODER,
    "moe": _DECODER,  # the decoder with MoE feed-forward layers
    "encoder": ModelFamily(EncoderMLM, encoder.param_counts, encoder.forward_terms, generates=False),
}


def model_family(cfg: ModelConfig) -> ModelFamily:
    if cfg.family not in FAMILIES:
        raise ConfigError(f"model.family: expected one of {', '.join(FAMILIES)}, got {cfg.family!r}")
    return FAMILIES[cfg.family]


def build_model(cfg: ModelConfig) -> nn.Module:
    return model_family(cfg).module(cfg)


__all__ = [
    "AUX_LOSS",
    "AUX_METRICS",
    "FAMILIES",
    "DecoderLM",
    "EncoderMLM",
    "ModelFamily",
    "ModelInputError",
    "build_model",
    "init_cache",
    "model_family",
    "moe_aux_loss",
]

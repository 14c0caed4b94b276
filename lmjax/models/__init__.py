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
from lmjax.models import decoder, encoder, t5
from lmjax.models.decoder import AUX_LOSS, AUX_METRICS, DecoderLM, ModelInputError, init_cache, moe_aux_loss
from lmjax.models.encoder import EncoderMLM
from lmjax.models.t5 import T5


@dataclass(frozen=True)
class ModelFamily:
    module: type[nn.Module]
    param_counts: Callable[[ModelConfig], dict[str, int]]
    # Chinchilla appendix-F terms of one example: (cfg, seq_len) or, encoder-decoders, (cfg, seq_len, decoder_len)
    forward_terms: Callable[..., dict[str, float]]
    generates: bool  # decodes left to right with a KV cache (lmjax generate)
    encoder_decoder: bool = False  # an encoder reads the input, a decoder writes the output (T5)


_DECODER = ModelFamily(DecoderLM, decoder.param_counts, decoder.forward_terms, generates=True)
FAMILIES: dict[str, ModelFamily] = {
    "dense": _DECODER,
    "moe": _DECODER,  # the decoder with MoE feed-forward layers
    "encoder": ModelFamily(EncoderMLM, encoder.param_counts, encoder.forward_terms, generates=False),
    "t5": ModelFamily(T5, t5.param_counts, t5.forward_terms, generates=True, encoder_decoder=True),
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
    "T5",
    "build_model",
    "init_cache",
    "model_family",
    "moe_aux_loss",
]

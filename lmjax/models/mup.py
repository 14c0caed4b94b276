"""μP, the maximal-update parameterization (Yang et al. 2022, Tensor Programs V), for Adam.

`model.parameterization: mup` with `model.mup_base_width` (the d_model of a base model whose tuned
hyperparameters should transfer); m = d_model / mup_base_width is the width multiplier. The rules,
in the abc form of microsoft/mup's MuReadout / MuAdamW:

- hidden matrices, both of whose dimensions grow with width (query, key, value, attention out, MLP
  and expert in/out, the MoE router, the MLM head's transform): init std * sqrt(1/m) (variance
  base / width, the fan-in scaling), Adam learning rate * 1/m;
- the logits * 1/m (tied or untied readout alike), so a readout with SP's init and learning rate
  moves them by O(1) whatever the width;
- attention scores * sqrt(base_head_dim) / head_dim instead of 1/sqrt(head_dim): they equal SP's at
  the base head size, and fall as 1/head_dim when heads widen (base_head_dim = model.head_dim when it
  is set: then heads keep their size as width grows, and the scale is SP's);
- token, position and token-type tables, norm scales, biases and the readout: SP's init and lr;
- `model.mup_zero_init`: the query projection and the untied readout start at zero (TP5's option).

Every multiplier is exactly 1.0 at m = 1, and the callers skip the multiplications then, so μP at
the base width is SP bit for bit. The router's expert axis does not grow with width: treated as
hidden it gets μP's update size (lr / m on a fan-in that grows) with an O(1) init, as SP's.
"""

from __future__ import annotations

from typing import Any

import jax

from lmjax.config import ModelConfig

# Kinds of `layers.init_std` that are hidden matrices.
HIDDEN_KINDS = ("query", "key_value", "attention_out", "mlp_in", "mlp_out", "router", "head_dense")
# Parameter names, by which `lr_multipliers` tells the kinds apart in a parameter tree: Dense
# modules whose `kernel` is a hidden matrix; the MoE layer's (module `mlp`) own hidden parameters
# (router [D, E], experts [E, D, F] / [E, F, D]); the parameters that keep SP's learning rate
# (tables, norms, biases, readout).
HIDDEN_KERNEL_MODULES = ("query", "key", "value", "out", "gate", "up", "down", "fc_in", "head_dense")
MOE_MODULE, MOE_HIDDEN_PARAMS = "mlp", ("router", "gate", "up", "down")
SP_PARAMS = ("embedding", "position_embedding", "token_type_embedding", "unembed", "scale", "bias", "output_bias")


def width_multiplier(config: ModelConfig) -> float:
    """m = d_model / mup_base_width under μP; 1.0 under SP."""
    if config.parameterization != "mup":
        return 1.0
    return config.d_model / config.mup_base_width


def init_multiplier(config: ModelConfig, kind: str) -> float:
    """Factor on SP's init std of a weight of `layers.init_std` kind `kind`."""
    if config.parameterization != "mup":
        return 1.0
    if config.mup_zero_init and kind in ("query", "unembed"):
        return 0.0
    return (config.mup_base_width / config.d_model) ** 0.5 if kind in HIDDEN_KINDS else 1.0


def logit_multiplier(config: ModelConfig) -> float:
    """Factor on the output logits: 1/m (MuReadout's output multiplier)."""
    return 1.0 / width_multiplier(config)


def attention_scale(config: ModelConfig) -> float | None:
    """The `scale` of jax.nn.dot_product_attention; None is 1/sqrt(head_dim) (SP)."""
    if config.parameterization != "mup":
        return config.attention_scale
    base_head_dim = config.head_dim if config.head_dim is not None else config.mup_base_width // config.n_heads
    if base_head_dim == config.head_size:
        return None  # the head size of the base model: SP's scale, computed by jax exactly as SP's
    return base_head_dim**0.5 / config.head_size


def is_hidden(path: tuple) -> bool:
    """Whether the parameter at `path` (a key path of the parameter tree) is a hidden matrix.
    Raises on a name without a rule: a new parameter must be classified here, not defaulted."""
    names = [str(getattr(key, "key", key)) for key in path]
    name, module = names[-1], (names[-2] if len(names) > 1 else "")
    if name == "kernel" and module in HIDDEN_KERNEL_MODULES:
        return True
    if module == MOE_MODULE and name in MOE_HIDDEN_PARAMS:
        return True
    if name in SP_PARAMS:
        return False
    raise ValueError(f"μP has no rule for parameter {'/'.join(names)}: add its name to lmjax/models/mup.py "
                     f"(hidden matrix, or a table/norm/bias/readout that keeps SP's learning rate)")


def is_router(path: tuple) -> bool:
    names = [str(getattr(key, "key", key)) for key in path]
    return names[-1] == "router" and len(names) > 1 and names[-2] == MOE_MODULE


def lr_multipliers(config: ModelConfig, params: Any) -> Any:
    """Tree of Python floats like `params` (unboxed): Adam's learning-rate factor per parameter,
    1/m for the hidden matrices, 1.0 for the rest (and for every parameter under SP), times
    `moe.router_lr_scale` for MoE routers."""
    hidden_factor = 1.0 / width_multiplier(config)
    router_factor = config.moe.router_lr_scale if config.family == "moe" else 1.0

    def factor(path, _) -> float:
        mup = hidden_factor if config.parameterization == "mup" and is_hidden(path) else 1.0
        return mup * (router_factor if is_router(path) else 1.0)

    return jax.tree_util.tree_map_with_path(factor, params)

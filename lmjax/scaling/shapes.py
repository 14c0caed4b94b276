"""Model shapes for a sweep: parameter counts under a convention, and the shape a target count gets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from lmjax import flops
from lmjax.config import ConfigError, ModelConfig
from lmjax.scaling.runs import PARAM_CONVENTIONS, params_under_convention

SHAPE_KEYS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff")


@dataclass(frozen=True)
class ShapeRules:
    """How a target parameter count becomes a model shape (vocab, style and the rest come from the base).

    Candidates: every (n_layers, d_model) with d_model a multiple of head_dim x query_groups and
    d_model / n_layers within a factor `aspect_tolerance` of `aspect_ratio`, with heads = d_model /
    head_dim, key/value heads = heads / query_groups, and d_ff = d_ff_ratio x d_model rounded to a
    multiple of `d_ff_multiple`. Among the candidates whose counted parameters are within
    `param_tolerance` of the target, the one with d_model / n_layers closest to `aspect_ratio` wins;
    if there is none, the one with the closest count (and the plan warns).
    """

    aspect_ratio: float = 32.0  # d_model / n_layers (Kaplan et al. 2020: loss is flat over a wide range)
    aspect_tolerance: float = 2.0
    head_dim: int = 32
    query_groups: int = 1  # query heads per key/value head; 1 = plain multi-head attention
    d_ff_ratio: float | None = None  # None: 8/3 for SwiGLU (llama; same matmul params as a 4x GELU MLP), 4 for gpt2
    d_ff_multiple: int = 64
    param_tolerance: float = 0.05
    max_layers: int = 128


def count_params(model: ModelConfig, convention: str) -> int:
    """N of a model under a convention (`runs.params_under_convention`): `non_embedding_with_head` adds a
    tied output head (an untied one is already in); `active` counts what one token uses (MoE: router,
    shared and top-k routed experts)."""
    if convention not in PARAM_CONVENTIONS:
        raise ConfigError(f"param_convention: expected one of {', '.join(PARAM_CONVENTIONS)}, got {convention!r}")
    return params_under_convention(flops.param_counts(model), convention, model.vocab_size * model.d_model)


def _shape(base: ModelConfig, rules: ShapeRules, d_model: int, n_layers: int) -> ModelConfig:
    ratio = rules.d_ff_ratio if rules.d_ff_ratio is not None else (8 / 3 if base.style == "llama" else 4.0)
    d_ff = max(rules.d_ff_multiple, round(ratio * d_model / rules.d_ff_multiple) * rules.d_ff_multiple)
    n_heads = d_model // rules.head_dim
    n_kv_heads = None if rules.query_groups == 1 else n_heads // rules.query_groups
    return dataclasses.replace(base, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                               n_kv_heads=n_kv_heads, head_dim=None, d_ff=d_ff)


def shape_for_params(target: float, base: ModelConfig, rules: ShapeRules, convention: str) -> ModelConfig:
    """The model shape for a target parameter count (rules: `ShapeRules`)."""
    if target <= 0:
        raise ConfigError(f"sizes: params must be > 0, got {target}")
    for key in ("head_dim", "query_groups", "d_ff_multiple", "max_layers", "aspect_ratio"):
        if getattr(rules, key) <= 0:
            raise ConfigError(f"shape.{key} must be > 0, got {getattr(rules, key)}")
    if rules.aspect_tolerance < 1:
        raise ConfigError(f"shape.aspect_tolerance is a factor >= 1, got {rules.aspect_tolerance}")
    unit = rules.head_dim * rules.query_groups
    best, best_cost = None, None
    for n_layers in range(1, rules.max_layers + 1):
        target_width = rules.aspect_ratio * n_layers
        low, high = target_width / rules.aspect_tolerance, target_width * rules.aspect_tolerance
        widths = list(range(max(unit, math.ceil(low / unit) * unit), math.floor(high / unit) * unit + 1, unit))
        widths = widths or [max(unit, round(target_width / unit) * unit)]  # band narrower than a unit
        for d_model in widths:
            model = _shape(base, rules, d_model, n_layers)
            count_error = abs(math.log(count_params(model, convention) / target))
            aspect_error = abs(math.log(d_model / n_layers / rules.aspect_ratio))
            if count_error <= math.log1p(rules.param_tolerance):  # close enough: the aspect ratio decides
                cost = (0, aspect_error, count_error)
            else:
                cost = (1, count_error, aspect_error)
            if best_cost is None or cost < best_cost:
                best, best_cost = model, cost
        if count_params(_shape(base, rules, widths[0], n_layers), convention) > 4 * target:
            break  # deeper models only get larger
    return best


# ----------------------------------------------------------------------------- the plan

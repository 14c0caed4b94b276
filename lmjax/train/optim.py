"""Optimizer and learning-rate schedules (optax), from `cfg.optim` and `cfg.train.steps`."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import optax

from lmjax.config import Config
from lmjax.models.mup import lr_multipliers


def make_schedule(cfg: Config) -> optax.Schedule:
    """Linear warmup from 0, then cosine / WSD (warmup-stable-decay) / constant, over train.steps."""
    base = _base_schedule(cfg)
    # optax evaluates the schedule at the count of updates already done (0 for the first), so
    # shift by one: the first update uses peak/warmup (not 0) and the last one reaches the final lr.
    return lambda count: base(count + 1)


def _base_schedule(cfg: Config) -> optax.Schedule:
    o, steps = cfg.optim, cfg.train.steps
    warmup = min(o.warmup_steps, steps)
    peak, final = o.lr, o.lr * o.min_lr_ratio
    if o.schedule == "cosine":
        # decay_steps counts the warmup too: the cosine ends exactly at the last step.
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1), end_value=final)
    warm = optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
    if o.schedule == "constant":
        return optax.join_schedules([warm, optax.constant_schedule(peak)], [warmup])
    # wsd: hold the peak, then decay linearly to `final` over the last decay_fraction of the run.
    decay_steps = max(1, round(steps * o.decay_fraction))
    stable_end = max(warmup, steps - decay_steps)
    return optax.join_schedules(
        [warm, optax.constant_schedule(peak), optax.linear_schedule(peak, final, steps - stable_end)],
        [warmup, stable_end],
    )


# Leaf names of the parameters that never get weight decay, and of the embedding-like tables.
NO_DECAY_NAMES = ("bias", "scale")
TABLE_NAMES = ("embedding", "position_embedding", "unembed")


def decay_mask(boxed_params: Any, decay_embeddings: bool) -> Any:
    """True for the parameters that get weight decay: weight matrices (kernels, experts, router).

    Decided by the parameter's own name: norm scales and biases get none; token/position tables
    and the untied output head get decay only with `decay_embeddings`.
    """

    def is_decayed(path, _) -> bool:
        name = str(getattr(path[-1], "key", path[-1]))
        if name in NO_DECAY_NAMES:
            return False
        return decay_embeddings or name not in TABLE_NAMES

    return jax.tree_util.tree_map_with_path(is_decayed, nn.unbox(boxed_params))


def scale_per_parameter(multipliers: Any) -> optax.GradientTransformation:
    """Multiplies each parameter's update by its Python float in `multipliers` (a tree like the
    parameters; 1.0 leaves untouched); stateless."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u if m == 1.0 else u * m, updates, multipliers), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: Config, boxed_params: Any) -> optax.GradientTransformation:
    """AdamW after global-norm clipping; `model.moe.router_lr_scale` scales the router's Adam step.
    Under μP, microsoft/mup's MuAdamW: the Adam step of each hidden matrix times 1/width multiplier,
    the decoupled decay step (lr * weight_decay * p) as SP's (MuAdamW divides lr and multiplies
    weight_decay by m), so weight decay transfers across widths."""
    o = cfg.optim
    parts = []
    if o.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(o.grad_clip))
    mask = decay_mask(boxed_params, o.decay_embeddings)
    if cfg.model.parameterization == "mup" or (cfg.model.family == "moe" and cfg.model.moe.router_lr_scale != 1.0):
        # optax.adamw's own chain with per-parameter factors (μP's, the router's) between the Adam step and the decay
        parts += [
            optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps),
            scale_per_parameter(lr_multipliers(cfg.model, nn.unbox(boxed_params))),
            optax.add_decayed_weights(o.weight_decay, mask),
            optax.scale_by_learning_rate(make_schedule(cfg)),
        ]
    else:  # unchanged since before μP: the same optimizer state, so older checkpoints resume
        parts.append(optax.adamw(make_schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask))
    return optax.chain(*parts)

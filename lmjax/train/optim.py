"""Optimizer and learning-rate schedules (optax), from `cfg.optim` and `cfg.train.steps`."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import optax

from lmjax.config import Config


def make_schedule(cfg: Config) -> optax.Schedule:
    """Linear warmup from 0, then cosine / WSD (warmup-stable-decay) / constant, over train.steps."""
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


def decay_mask(boxed_params: Any, decay_embeddings: bool) -> Any:
    """True for the parameters that get weight decay: weight matrices.

    Read from the logical axis names: vectors (norm scales, biases) get no decay; neither do
    tables indexed by token or position (a `vocab` axis, or an unnamed row axis such as the
    learned position table), unless `decay_embeddings`.
    """

    def is_decayed(leaf: Any) -> bool:
        names = tuple(n for n in leaf.names if n != "layers") if isinstance(leaf, nn.LogicallyPartitioned) else ()
        if len(names) < 2:
            return False
        is_table = "vocab" in names or None in names
        return decay_embeddings or not is_table

    mask = jax.tree_util.tree_map(is_decayed, boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    return mask


def make_optimizer(cfg: Config, boxed_params: Any) -> optax.GradientTransformation:
    o = cfg.optim
    parts = []
    if o.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(o.grad_clip))
    parts.append(
        optax.adamw(
            make_schedule(cfg),
            b1=o.b1,
            b2=o.b2,
            eps=o.eps,
            weight_decay=o.weight_decay,
            mask=decay_mask(boxed_params, o.decay_embeddings),
        )
    )
    return optax.chain(*parts)

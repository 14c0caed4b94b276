"""Training objectives: pure functions `loss_fn(params, batch, model, ...) -> (loss, metrics)`.

Each returns SUMS over the batch (loss summed over target tokens, token counts), not means:
gradient accumulation and data parallelism then add micro-batch results exactly, and the train
step divides once by the global token count. The trainer knows nothing else about objectives;
a new objective is a new function registered in `OBJECTIVES`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

from lmjax.models import moe_aux_loss

Batch = dict[str, jax.Array]


def token_cross_entropy(logits_BLV: jax.Array, targets_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy and log-partition (float32), without materialising one-hot targets."""
    logits_BLV = logits_BLV.astype(jnp.float32)
    log_z_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
    return log_z_BL - target_logit_BL, log_z_BL


def causal_lm_loss(params: Any, batch: Batch, model: nn.Module, z_loss: float = 0.0) -> tuple[jax.Array, dict]:
    """Next-token prediction on packed rows; `loss_mask` removes cross-document and padding targets.

    Returns (objective_sum, metrics) where objective_sum = sum(ce) + z_loss * sum(log_z^2) over
    masked tokens (z-loss as in PaLM, keeps the softmax normaliser near 0), plus, for MoE models,
    the router auxiliary loss (a per-token mean) times the token count.
    """
    logits_BLV, state = model.apply(
        {"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"], mutable=["intermediates"]
    )
    ce_BL, log_z_BL = token_cross_entropy(logits_BLV, batch["targets"])
    mask_BL = batch["loss_mask"].astype(jnp.float32)
    ce_sum = jnp.sum(ce_BL * mask_BL)
    z_sum = jnp.sum(jnp.square(log_z_BL) * mask_BL)
    tokens = jnp.sum(mask_BL)
    objective = ce_sum + z_loss * z_sum if z_loss else ce_sum
    metrics = {"loss_sum": ce_sum, "z_loss_sum": z_sum, "tokens": tokens}
    moe = moe_aux_loss(state.get("intermediates", {}), model.config)
    if moe is not None:
        aux_loss, moe_metrics = moe
        objective = objective + aux_loss * tokens
        # Token-weighted sums like the others: the train step divides every metric by the tokens.
        metrics.update({name: value * tokens for name, value in moe_metrics.items()})
    return objective, metrics


def eval_sums(params: Any, batch: Batch, model: nn.Module, token_bytes_V: jax.Array) -> dict[str, jax.Array]:
    """Summed validation loss, token count and byte count (for bits per byte)."""
    logits_BLV = model.apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"])
    ce_BL, _ = token_cross_entropy(logits_BLV, batch["targets"])
    mask_BL = batch["loss_mask"].astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(ce_BL * mask_BL),
        "tokens": jnp.sum(mask_BL),
        "bytes": jnp.sum(token_bytes_V[batch["targets"]] * mask_BL),
    }


OBJECTIVES: dict[str, Callable[..., tuple[jax.Array, dict]]] = {"causal_lm": causal_lm_loss}

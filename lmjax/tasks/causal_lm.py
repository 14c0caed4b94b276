"""`train.objective: causal_lm`: next-token prediction on packed rows (decoder families)."""

from __future__ import annotations

import jax.numpy as jnp

from lmjax.data.pipeline import CausalRows
from lmjax.tasks.base import Task, token_cross_entropy


class CausalLMTask(Task):
    """Cross-entropy of every in-document next token (`loss_mask` removes cross-document and
    padding targets), plus the z-loss and the model's auxiliary loss (`Task.objective`)."""

    name = "causal_lm"

    def layout(self, tokenizer):
        return CausalRows()

    def loss(self, params, frozen, batch, model):
        logits_BLV, state = model.apply({"params": params}, *self.model_inputs(batch), mutable=["intermediates"])
        ce_BL, log_z_BL = token_cross_entropy(logits_BLV, batch["targets"])
        mask_BL = batch["loss_mask"].astype(jnp.float32)
        sums = {
            "loss_sum": jnp.sum(ce_BL * mask_BL),
            "z_loss_sum": jnp.sum(jnp.square(log_z_BL) * mask_BL),
            "tokens": jnp.sum(mask_BL),
        }
        return self.objective(sums, state), sums

    def eval_sums(self, params, frozen, batch, model, constants):
        logits_BLV = model.apply({"params": params}, *self.model_inputs(batch))
        ce_BL, _ = token_cross_entropy(logits_BLV, batch["targets"])
        mask_BL = batch["loss_mask"].astype(jnp.float32)
        return {
            "loss_sum": jnp.sum(ce_BL * mask_BL),
            "tokens": jnp.sum(mask_BL),
            "bytes": jnp.sum(constants["token_bytes"][batch["targets"]] * mask_BL),
        }

"""`train.objective: causal_lm`: next-token prediction on packed rows (decoder families)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmjax.data.pipeline import CausalRows
from lmjax.tasks.base import Task, sown_aux_loss, token_cross_entropy


class CausalLMTask(Task):
    """Cross-entropy of every in-document next token (`loss_mask` removes cross-document and
    padding targets), plus `train.z_loss` x sum(log_z^2) (PaLM: keeps the softmax normaliser near
    0) and the model's sown auxiliary loss (MoE router losses) per target token."""

    name = "causal_lm"

    def layout(self, tokenizer):
        return CausalRows()

    def loss(self, params, frozen, batch, model):
        logits_BLV, state = model.apply({"params": params}, *self.model_inputs(batch), mutable=["intermediates"])
        ce_BL, log_z_BL = token_cross_entropy(logits_BLV, batch["targets"])
        mask_BL = batch["loss_mask"].astype(jnp.float32)
        ce_sum = jnp.sum(ce_BL * mask_BL)
        z_sum = jnp.sum(jnp.square(log_z_BL) * mask_BL)
        tokens = jnp.sum(mask_BL)
        z_loss = self.cfg.train.z_loss
        objective = ce_sum + z_loss * z_sum if z_loss else ce_sum
        sums = {"loss_sum": ce_sum, "z_loss_sum": z_sum, "tokens": tokens}
        aux_loss, aux_metrics = sown_aux_loss(state)
        if aux_loss is not None:
            objective = objective + aux_loss * tokens
            # Token-weighted sums like the others: the train metrics divide them by the tokens.
            sums.update({name: value * tokens for name, value in aux_metrics.items()})
        return objective, sums

    def eval_sums(self, params, frozen, batch, model, constants):
        logits_BLV = model.apply({"params": params}, *self.model_inputs(batch))
        ce_BL, _ = token_cross_entropy(logits_BLV, batch["targets"])
        mask_BL = batch["loss_mask"].astype(jnp.float32)
        return {
            "loss_sum": jnp.sum(ce_BL * mask_BL),
            "tokens": jnp.sum(mask_BL),
            "bytes": jnp.sum(constants["token_bytes"][batch["targets"]] * mask_BL),
        }

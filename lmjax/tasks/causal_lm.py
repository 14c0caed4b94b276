"""`train.objective: causal_lm`: next-token prediction on packed rows (decoder families).

With `model.loss_chunk_tokens` set, the model is given the targets and returns the per-token
cross-entropy and log-partition itself (lmjax/models/fused_cross_entropy.py) instead of logits;
the sums below are the same either way. In training it is also given the loss mask and the z-loss
weight and returns their weighted sum with its gradients already computed in the forward pass.
"""

from __future__ import annotations

import jax.numpy as jnp

from lmjax.data.pipeline import CausalRows
from lmjax.tasks.base import Task, masked_token_sums, token_cross_entropy


class CausalLMTask(Task):
    """Cross-entropy of every in-document next token (`loss_mask` removes cross-document and
    padding targets), plus the z-loss and the model's auxiliary loss (`Task.objective`)."""

    name = "causal_lm"

    def layout(self, tokenizer):
        return CausalRows()

    def token_losses(self, params, batch, model, mutable=False):
        """(cross-entropy, log Z) per token, float32 [B, L] each, and the model's `mutable` state ({} if False)."""
        variables, inputs = {"params": params}, self.model_inputs(batch)
        if self.cfg.model.loss_chunk_tokens is None:
            out = model.apply(variables, *inputs, mutable=mutable)
            logits_BLV, state = out if mutable else (out, {})
            return (*token_cross_entropy(logits_BLV, batch["targets"]), state)
        out = model.apply(variables, *inputs, targets=batch["targets"], mutable=mutable)
        (ce_BL, log_z_BL), state = out if mutable else (out, {})
        return ce_BL, log_z_BL, state

    def loss(self, params, frozen, batch, model):
        if self.cfg.model.loss_chunk_tokens is None:
            ce_BL, log_z_BL, state = self.token_losses(params, batch, model, mutable=["intermediates"])
            sums = masked_token_sums(ce_BL, log_z_BL, batch)
            return self.objective(sums, state), sums
        (token_objective, ce_BL, log_z_BL), state = model.apply(
            {"params": params}, *self.model_inputs(batch), targets=batch["targets"],
            target_weights=batch["loss_mask"], z_loss=self.cfg.train.z_loss, mutable=["intermediates"])
        sums = masked_token_sums(ce_BL, log_z_BL, batch)
        return self.objective(sums, state, token_objective), sums

    def eval_sums(self, params, frozen, batch, model, constants):
        ce_BL, _, _ = self.token_losses(params, batch, model)
        sums = masked_token_sums(ce_BL, None, batch)
        sums["bytes"] = jnp.sum(constants["token_bytes"][batch["targets"]] * batch["loss_mask"].astype(jnp.float32))
        return sums

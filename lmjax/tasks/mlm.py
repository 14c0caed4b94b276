"""`train.objective: mlm`: masked-token prediction (BERT) for the encoder family.

Batches are windows of the corpus corrupted by `lmjax.data.masking` (15% of tokens selected, of
those 80% <mask>, 10% random, 10% kept); loss and accuracy count the selected tokens only.
Eval also reports the accuracy of the unigram-frequency baseline (always predicting the most
frequent regular token of the training split) on the same selected tokens.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from lmjax.config import data_seed
from lmjax.data.masking import MaskedRows, MaskingTables
from lmjax.tasks.base import Task, target_token_sums


class MLMTask(Task):
    name = "mlm"

    def layout(self, tokenizer):
        tables = MaskingTables(tokenizer, self.cfg.mlm, self.cfg.data.tokenizer.special_tokens)
        return MaskedRows(self.cfg.mlm, tables, data_seed(self.cfg))

    def loss(self, params, frozen, batch, model):
        logits_BLV, state = model.apply({"params": params}, *self.model_inputs(batch), mutable=["intermediates"])
        sums = target_token_sums(logits_BLV, batch, "mlm_accuracy")
        return self.objective(sums, state), sums

    def eval_constants(self, data):
        constants = super().eval_constants(data)
        counts = np.bincount(np.asarray(data.train.tokens), minlength=data.tokenizer.vocab_size)
        regular = data.layout.tables.random_pool  # ids that are neither control nor special
        constants["most_frequent_token"] = np.asarray(regular[np.argmax(counts[regular])], np.int32)
        return constants

    def eval_sums(self, params, frozen, batch, model, constants):
        logits_BLV = model.apply({"params": params}, *self.model_inputs(batch))
        sums = target_token_sums(logits_BLV, batch, "mlm_accuracy")
        mask_BL = batch["loss_mask"].astype(jnp.float32)
        sums["bytes"] = jnp.sum(constants["token_bytes"][batch["targets"]] * mask_BL)
        sums["unigram_correct"] = jnp.sum((batch["targets"] == constants["most_frequent_token"]) * mask_BL)
        return sums

    def eval_metrics(self, totals):
        metrics = super().eval_metrics(totals)  # loss, perplexity and bits per byte over the masked tokens
        tokens = max(totals["tokens"], 1.0)
        metrics["eval_mlm_accuracy"] = totals["mlm_accuracy_sum"] / tokens
        metrics["eval_unigram_accuracy"] = totals["unigram_correct"] / tokens
        return metrics

"""Encoder-decoder objectives (family t5): `span_corruption` (T5's denoising pretraining) and
`seq2seq` (input -> target pairs from JSONL).

Both train the decoder to predict `targets` from the encoder's `encoder_tokens` and its own
`decoder_tokens` (the targets shifted right, each pair starting with the decoder start token);
loss, accuracy and bits per byte count the real target tokens (`loss_mask`). A row holds
`data.seq_len` encoder tokens and `decoder_len()` decoder tokens; both count as the row's tokens
in throughput and FLOPs (`lmjax.flops`, per token of encoder input and decoder target).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmjax.config import data_seed
from lmjax.tasks.base import Batch, Task, target_token_sums

ENCODER_KEYS = ("encoder_tokens", "encoder_segment_ids", "encoder_positions")
DECODER_KEYS = ("decoder_tokens", "decoder_segment_ids", "decoder_positions", "targets")


class EncoderDecoderTask(Task):
    """Cross-entropy of the target tokens given the input; subclasses choose the rows."""

    def batch_schema(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        encoder, decoder = (batch_size, self.cfg.data.seq_len), (batch_size, self.decoder_len())
        schema = {key: jax.ShapeDtypeStruct(encoder, jnp.int32) for key in ENCODER_KEYS}
        schema.update({key: jax.ShapeDtypeStruct(decoder, jnp.int32) for key in DECODER_KEYS})
        schema["loss_mask"] = jax.ShapeDtypeStruct(decoder, jnp.float32)
        return schema

    def model_inputs(self, batch: Batch) -> tuple[jax.Array, ...]:
        return (
            batch["encoder_tokens"], batch["decoder_tokens"], batch["encoder_positions"], batch["encoder_segment_ids"],
            batch["decoder_positions"], batch["decoder_segment_ids"],
        )

    def loss(self, params, frozen, batch, model):
        logits_BLV, state = model.apply({"params": params}, *self.model_inputs(batch), mutable=["intermediates"])
        sums = target_token_sums(logits_BLV, batch, "token_accuracy")
        return self.objective(sums, state), sums

    def eval_sums(self, params, frozen, batch, model, constants):
        logits_BLV = model.apply({"params": params}, *self.model_inputs(batch))
        sums = target_token_sums(logits_BLV, batch, "token_accuracy")
        sums["bytes"] = jnp.sum(constants["token_bytes"][batch["targets"]] * batch["loss_mask"])
        return sums

    def eval_metrics(self, totals):
        metrics = super().eval_metrics(totals)  # loss, perplexity and bits per byte over the target tokens
        metrics["eval_token_accuracy"] = totals["token_accuracy_sum"] / max(totals["tokens"], 1.0)
        return metrics


class SpanCorruptionTask(EncoderDecoderTask):
    """T5's noise on windows of the corpus (lmjax/data/span_corruption.py): each span replaced by a
    sentinel in the input, the target lists the sentinels with the spans they replaced."""

    name = "span_corruption"

    def decoder_len(self) -> int:
        from lmjax.data.span_corruption import lengths

        return lengths(self.cfg.span_corruption, self.cfg.data.seq_len)[1]

    def layout(self, tokenizer):
        from lmjax.data.span_corruption import SpanCorruptionRows

        return SpanCorruptionRows(self.cfg.span_corruption, tokenizer, data_seed(self.cfg))

    def eval_constants(self, data):
        """Sentinels stand for no text of the document: zero bytes in bits per byte (their pieces'
        literal text, `<extra_id_k>`, would count 12-13 bytes each)."""
        constants = super().eval_constants(data)
        constants["token_bytes"][data.layout.sentinels(self.cfg.data.seq_len)] = 0
        return constants


class Seq2SeqTask(EncoderDecoderTask):
    """Input/target pairs of JSONL records (lmjax/data/seq2seq.py), packed several per row."""

    name = "seq2seq"

    def decoder_len(self) -> int:
        return self.cfg.seq2seq.target_len

    def layout(self, tokenizer):
        from lmjax.data.seq2seq import Seq2SeqRows

        return Seq2SeqRows(self.cfg.seq2seq)

    def build_data(self, cfg):
        from lmjax.data.seq2seq import build_pair_data

        return build_pair_data(cfg)

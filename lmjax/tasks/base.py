"""The task interface: everything that differs between training modes, in one place.

A task (chosen by `train.objective`) supplies
- its batch: `batch_schema` (keys, shapes, dtypes) and the row layout that makes host batches of
  that schema from the tokenized corpus (`layout`, a seeded, resumable grain transform);
- its loss as SUMS over the batch plus the name of its normaliser (`normalizer`: target tokens
  for LMs, pairs for DPO): gradient accumulation and data parallelism add micro-batch sums
  exactly, and the train step divides once by the global normaliser;
- `train_metrics` (per-normaliser means of the sums, inside the jitted step);
- eval: `eval_sums` per batch (inside jit) and `eval_metrics` (the means, computed once on the host
  from the summed totals); keys of `eval_metrics` start with `eval_`, and the summary records the
  final evaluation as `final_<key>`;
- optional frozen state (`init_frozen`, e.g. a DPO reference model): created with the parameters,
  carried in the train state, never updated, saved and restored with it; logical axis names on its
  leaves (`nn.with_logical_partitioning`, or the parameters' own boxes) declare its sharding.
The trainer, the step, checkpoints and sweeps call these and know nothing else about tasks.
Parameter and FLOP counts belong to the model family (`lmjax.models.FAMILIES`).

Tasks never import model code: they call `model.apply` and read what the model sows at the top
level of its 'intermediates' (AUX_LOSS, a per-token loss to add, and AUX_METRICS).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmjax.config import Config
from lmjax.data.pipeline import RowLayout
from lmjax.data.tokenizer import Tokenizer

Batch = dict[str, jax.Array]
AUX_LOSS, AUX_METRICS = "aux_loss", "aux_metrics"  # what models sow (lmjax/models/decoder.py)


def token_cross_entropy(logits_BLV: jax.Array, targets_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy and log-partition (float32), without materialising one-hot targets."""
    logits_BLV = logits_BLV.astype(jnp.float32)
    log_z_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
    return log_z_BL - target_logit_BL, log_z_BL


def sown_aux_loss(state: dict) -> tuple[jax.Array | None, dict[str, jax.Array]]:
    """(per-token auxiliary loss or None, its metrics) from a forward pass's mutable state."""
    intermediates = state.get("intermediates", {})
    loss = intermediates.get(AUX_LOSS)
    metrics = intermediates.get(AUX_METRICS)
    return (loss[0] if loss else None), (metrics[0] if metrics else {})


class Task:
    """Base class; see the module docstring. Subclasses set `name` and implement the loss."""

    name = ""
    normalizer = "tokens"  # the sums entry the gradient and the train metrics are divided by

    def __init__(self, cfg: Config):
        self.cfg = cfg

    # ------------------------------------------------------------------ batch
    def batch_schema(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Keys, shapes and dtypes of a batch of `batch_size` rows (the default: packed token rows)."""
        shape = (batch_size, self.cfg.data.seq_len)
        return {
            "tokens": jax.ShapeDtypeStruct(shape, jnp.int32),
            "targets": jax.ShapeDtypeStruct(shape, jnp.int32),
            "segment_ids": jax.ShapeDtypeStruct(shape, jnp.int32),
            "positions": jax.ShapeDtypeStruct(shape, jnp.int32),
            "loss_mask": jax.ShapeDtypeStruct(shape, jnp.float32),
        }

    def layout(self, tokenizer: Tokenizer) -> RowLayout:
        raise NotImplementedError

    def model_inputs(self, batch: Batch) -> tuple[jax.Array, ...]:
        return batch["tokens"], batch["positions"], batch["segment_ids"]

    # ------------------------------------------------------------------ state
    def init_frozen(self, rng: jax.Array, params: Any) -> Any:
        """Frozen state made from a fresh key and the freshly initialised (boxed) parameters."""
        return {}

    # ------------------------------------------------------------------ loss and metrics
    def loss(self, params: Any, frozen: Any, batch: Batch, model: nn.Module) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(objective summed over the batch, sums incl. `loss_sum` and the normaliser)."""
        raise NotImplementedError

    def train_metrics(self, sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Logged train metrics: `loss` and any other sum, divided by the normaliser; the
        normaliser itself as `target_<normalizer>`."""
        count = jnp.maximum(sums[self.normalizer], 1.0)
        metrics = {"loss": sums["loss_sum"] / count}
        metrics.update({name.removesuffix("_sum"): value / count for name, value in sums.items() if name not in ("loss_sum", self.normalizer)})
        metrics[f"target_{self.normalizer}"] = sums[self.normalizer]
        return metrics

    # ------------------------------------------------------------------ eval
    def eval_constants(self, tokenizer: Tokenizer, data: Any) -> dict[str, np.ndarray]:
        """Host arrays every eval step reads (replicated on the mesh), e.g. bytes per token id."""
        table = np.zeros(self.cfg.model.vocab_size, np.float32)
        table[: len(tokenizer.token_bytes)] = tokenizer.token_bytes
        return {"token_bytes": table}

    def eval_sums(self, params: Any, frozen: Any, batch: Batch, model: nn.Module, constants: dict) -> dict[str, jax.Array]:
        raise NotImplementedError

    def eval_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        """Loss, perplexity and bits per byte over the evaluated target tokens."""
        tokens = max(totals["tokens"], 1.0)
        loss = totals["loss_sum"] / tokens
        return {
            "eval_loss": loss,
            "eval_ppl": math.exp(min(loss, 50.0)),
            "eval_bpb": totals["loss_sum"] / math.log(2) / max(totals["bytes"], 1.0),
            "eval_tokens": totals["tokens"],
        }

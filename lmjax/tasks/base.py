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
  leaves (`nn.with_logical_partitioning`, or the parameters' own boxes) declare its sharding;
- optional `prepare`: data computed once from the initial parameters before the first step and
  kept in the run directory (e.g. DPO's precomputed reference log-probabilities).
The trainer, the step, checkpoints and sweeps call these and know nothing else about tasks.
Parameter and FLOP counts belong to the model family (`lmjax.models.FAMILIES`).

Tasks never import model code: they call `model.apply` and read what the model sows at the top
level of its 'intermediates' (AUX_LOSS, a per-token loss to add, and AUX_METRICS).
"""

from __future__ import annotations

import abc
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmjax.config import Config
from lmjax.data.pipeline import Data, RowLayout, build_data
from lmjax.data.tokenizer import Tokenizer

Batch = dict[str, jax.Array]
AUX_LOSS, AUX_METRICS = "aux_loss", "aux_metrics"  # what models sow (lmjax/models/decoder.py)


def token_cross_entropy(logits_BLV: jax.Array, targets_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy and log-partition (float32), without materialising one-hot targets."""
    logits_BLV = logits_BLV.astype(jnp.float32)
    log_z_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
    return log_z_BL - target_logit_BL, log_z_BL


def masked_token_sums(ce_BL: jax.Array, log_z_BL: jax.Array | None, batch: Batch) -> dict[str, jax.Array]:
    """Sums over the target tokens of `batch` (`loss_mask`): cross-entropy, z-loss (unless
    `log_z_BL` is None) and the token count, the normaliser."""
    mask_BL = batch["loss_mask"].astype(jnp.float32)
    sums = {"loss_sum": jnp.sum(ce_BL * mask_BL)}
    if log_z_BL is not None:
        sums["z_loss_sum"] = jnp.sum(jnp.square(log_z_BL) * mask_BL)
    sums["tokens"] = jnp.sum(mask_BL)
    return sums


def target_token_sums(logits_BLV: jax.Array, batch: Batch, accuracy_name: str) -> dict[str, jax.Array]:
    """`masked_token_sums` of the logits' cross-entropy, plus the argmax accuracy (as `{accuracy_name}_sum`)."""
    ce_BL, log_z_BL = token_cross_entropy(logits_BLV, batch["targets"])
    sums = masked_token_sums(ce_BL, log_z_BL, batch)
    correct_BL = (jnp.argmax(logits_BLV, axis=-1) == batch["targets"]).astype(jnp.float32)
    sums[f"{accuracy_name}_sum"] = jnp.sum(correct_BL * batch["loss_mask"].astype(jnp.float32))
    return sums


class Task(abc.ABC):
    """Base class; see the module docstring. Subclasses set `name` and implement the abstract methods."""

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

    @abc.abstractmethod
    def layout(self, tokenizer: Tokenizer) -> RowLayout:
        """The row layout that makes this task's host batches from the tokenized corpus."""

    def build_data(self, cfg: Config) -> Data:
        """The data of a run of this task (`cfg` may differ from `self.cfg` in its tokenizer path):
        the corpus, tokenized and laid out in rows (default), or the task's own examples."""
        return build_data(cfg, self.layout)

    def decoder_len(self) -> int | None:
        """Decoder tokens per row of an encoder-decoder task (None: one sequence of `data.seq_len`)."""
        return None

    def tokens_per_row(self) -> int:
        """Tokens one row trains on (encoder plus decoder tokens for encoder-decoders): the unit
        of throughput and of `lmjax.flops`' per-token counts."""
        return self.cfg.data.seq_len + (self.decoder_len() or 0)

    def forward_passes(self) -> float:
        """Forward-pass equivalents of compute per trained token, for TFLOP/s and MFU: 3 (the
        forward pass and a backward pass of twice its cost)."""
        return 3.0

    def model_inputs(self, batch: Batch) -> tuple[jax.Array, ...]:
        return batch["tokens"], batch["positions"], batch["segment_ids"]

    # ------------------------------------------------------------------ state
    def init_frozen(self, rng: jax.Array, params: Any) -> Any:
        """Frozen state made from a fresh key and the freshly initialised (boxed) parameters."""
        return {}

    def prepare(self, data: Data, setup: Any, params: Any, run_dir: Any, fresh: bool) -> None:
        """Called with the run's data and parameters before training (`fresh`: at step 0) and
        before `lmjax eval`; may attach what it computes to `data`. Default: nothing."""

    # ------------------------------------------------------------------ loss and metrics
    @abc.abstractmethod
    def loss(self, params: Any, frozen: Any, batch: Batch, model: nn.Module) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(objective summed over the batch, sums incl. `loss_sum` and the normaliser)."""

    def objective(self, sums: dict[str, jax.Array], model_state: dict, token_objective: jax.Array | None = None) -> jax.Array:
        """`loss_sum` + `train.z_loss` x `z_loss_sum` (PaLM) + the model's sown auxiliary loss (a
        per-token mean, e.g. MoE router losses) x the normaliser. Adds the auxiliary metrics to
        `sums`, weighted by the normaliser like every other sum. `token_objective`: the first two
        terms as the model computed them (the fused cross-entropy, which carries their gradient)."""
        z_loss = self.cfg.train.z_loss
        if token_objective is not None:
            objective = token_objective
        else:
            objective = sums["loss_sum"] + z_loss * sums["z_loss_sum"] if z_loss else sums["loss_sum"]
        intermediates = model_state.get("intermediates", {})
        if AUX_LOSS in intermediates:
            count = sums[self.normalizer]
            objective = objective + intermediates[AUX_LOSS][0] * count
            sums.update({name: value * count for name, value in intermediates[AUX_METRICS][0].items()})
        return objective

    def train_metrics(self, sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Logged train metrics: `loss` and any other sum, divided by the normaliser; the
        normaliser itself as `target_<normalizer>`."""
        count = jnp.maximum(sums[self.normalizer], 1.0)
        metrics = {"loss": sums["loss_sum"] / count}
        metrics.update({name.removesuffix("_sum"): value / count for name, value in sums.items() if name not in ("loss_sum", self.normalizer)})
        metrics[f"target_{self.normalizer}"] = sums[self.normalizer]
        return metrics

    # ------------------------------------------------------------------ eval
    def eval_constants(self, data: Data) -> dict[str, np.ndarray]:
        """Host arrays every eval step reads (replicated on the mesh), e.g. bytes per token id."""
        table = np.zeros(self.cfg.model.vocab_size, np.float32)
        table[: len(data.tokenizer.token_bytes)] = data.tokenizer.token_bytes
        return {"token_bytes": table}

    @abc.abstractmethod
    def eval_sums(self, params: Any, frozen: Any, batch: Batch, model: nn.Module, constants: dict) -> dict[str, jax.Array]:
        """Sums over one eval batch (inside jit); `eval_metrics` turns their totals into means."""

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

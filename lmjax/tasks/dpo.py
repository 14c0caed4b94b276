"""`train.objective: dpo`: direct preference optimisation (Rafailov et al. 2023) on the one trainer.

A batch holds row pairs (lmjax/data/post_training.py): `chosen_*` rows with prompt + preferred
response and `rejected_*` rows with the same prompts + the other response, pair k in segment k + 1
of both. One forward pass reads both ([B, 2, L] -> [2B, L], interleaved so every device keeps its
own rows), and each pair's log-probability of a response is the sum over its response tokens
(`loss_mask`), gathered per segment: log pi(y|x) = sum_t log pi(y_t | x, y_<t).

With h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)] per pair:
- sigmoid:      -log sigmoid(beta h)
- conservative: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)  (labels flipped w.p. eps)
- ipo:          (h - 1 / (2 beta))^2  (Azar et al. 2023, on summed log-probabilities)
Losses and metrics are summed over pairs and divided by the number of pairs (`normalizer`), not by
tokens, so a long response weighs as much as a short one. At initialisation the policy equals the
reference, h = 0 and the sigmoid loss is log 2.

The reference is the initial policy: frozen parameters made from the parameters the run starts
with (`init_frozen`, sharded like them; saved and restored with the train state), or, with
`dpo.reference: precomputed`, its log-probabilities of every pair computed once before the first
step and saved as run_dir/reference_logps.npz (`prepare`), which the rows then carry.

Metrics: `dpo/reward_chosen` and `dpo/reward_rejected` (beta times the log-ratios),
`dpo/reward_accuracy` (chosen reward above rejected), `dpo/reward_margin`, and `dpo/kl`, the mean
policy-reference log-ratio of the chosen responses (an estimate of KL(pi || ref) on those texts).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from lmjax.data.pipeline import host_slice
from lmjax.errors import CheckpointError
from lmjax.fileio import write_bytes_atomic
from lmjax.sharding import host_batch_to_global
from lmjax.tasks.base import Batch, Task, token_cross_entropy

SIDES = ("chosen", "rejected")
FIELDS = ("tokens", "targets", "segment_ids", "positions")
REFERENCE_FILE = "reference_logps.npz"
METRICS = ("reward_chosen", "reward_rejected", "reward_accuracy", "reward_margin", "kl")


def preference_losses(h: jax.Array, beta: float, loss: str, label_smoothing: float = 0.0) -> jax.Array:
    """Per-pair DPO losses from the difference of policy-reference log-ratios `h` (see the module docstring)."""
    if loss == "sigmoid":
        return -jax.nn.log_sigmoid(beta * h)
    if loss == "conservative":
        return -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - label_smoothing * jax.nn.log_sigmoid(-beta * h)
    if loss == "ipo":
        return jnp.square(h - 1 / (2 * beta))
    raise ValueError(f"dpo.loss: expected sigmoid, ipo or conservative, got {loss!r}")


def response_logps(model, params: Any, batch: Batch) -> tuple[jax.Array, jax.Array, dict]:
    """(log-probabilities [B, 2, L] of the responses: [b, side, k] for the pair with segment id k + 1
    (0 where there is none), pair mask [B, L], the model's mutable state)."""
    batch_size, length = batch["chosen_tokens"].shape

    def both(key: str) -> jax.Array:  # [B, L] x 2 -> [2B, L], rows (b, chosen), (b, rejected), ...
        return jnp.stack([batch[f"{side}_{key}"] for side in SIDES], axis=1).reshape(2 * batch_size, length)

    logits, state = model.apply({"params": params}, both("tokens"), both("positions"), both("segment_ids"), mutable=["intermediates"])
    ce, _ = token_cross_entropy(logits, both("targets"))
    mask, segments = both("loss_mask").astype(jnp.float32), both("segment_ids")

    def per_segment(values_2BL: jax.Array) -> jax.Array:
        sums = jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, num_segments=length + 1))(values_2BL, segments)
        return sums[:, 1:].reshape(batch_size, 2, length)

    logps, counts = per_segment(-ce * mask), per_segment(mask)
    return logps, (counts[:, 0] > 0) & (counts[:, 1] > 0), state


class DPOTask(Task):
    name = "dpo"
    normalizer = "pairs"

    @property
    def precomputed(self) -> bool:
        return self.cfg.dpo.reference == "precomputed"

    def batch_schema(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        shape = (batch_size, self.cfg.data.seq_len)
        schema = {f"{side}_{key}": jax.ShapeDtypeStruct(shape, jnp.int32) for side in SIDES for key in FIELDS}
        schema.update({f"{side}_loss_mask": jax.ShapeDtypeStruct(shape, jnp.float32) for side in SIDES})
        if self.precomputed:
            schema.update({f"reference_{side}": jax.ShapeDtypeStruct(shape, jnp.float32) for side in SIDES})
        return schema

    def layout(self, tokenizer):
        from lmjax.data.post_training import example_rows

        return example_rows(self.cfg, "dpo")

    def build_data(self, cfg):
        from lmjax.data.post_training import build_preference_data

        return build_preference_data(cfg)

    def tokens_per_row(self) -> int:
        """A row pair is two rows the policy trains on."""
        return 2 * self.cfg.data.seq_len

    def forward_passes(self) -> float:
        """The policy's forward and backward passes, plus the frozen reference's forward pass when it
        runs in the step (`dpo.reference: model`); precomputed log-probabilities cost nothing per step."""
        return 3.0 if self.precomputed else 4.0

    def init_frozen(self, rng, params):
        return {} if self.precomputed else {"reference": params}  # the same boxes: sharded like the policy

    # ------------------------------------------------------------------ loss
    def _sums(self, params, frozen, batch, model) -> tuple[dict[str, jax.Array], dict]:
        policy, valid, state = response_logps(model, params, batch)
        if self.precomputed:
            reference = jnp.stack([batch[f"reference_{side}"] for side in SIDES], axis=1)
        else:
            reference, _, _ = response_logps(model, jax.lax.stop_gradient(frozen["reference"]), batch)
        ratios = policy - reference  # [B, 2, L]
        h = ratios[:, 0] - ratios[:, 1]
        settings, weight = self.cfg.dpo, valid.astype(jnp.float32)
        losses = preference_losses(h, settings.beta, settings.loss, settings.label_smoothing)
        rewards = settings.beta * jax.lax.stop_gradient(ratios)
        values = {
            "reward_chosen": rewards[:, 0],
            "reward_rejected": rewards[:, 1],
            "reward_accuracy": (rewards[:, 0] > rewards[:, 1]).astype(jnp.float32),
            "reward_margin": rewards[:, 0] - rewards[:, 1],
            "kl": jax.lax.stop_gradient(ratios[:, 0]),
        }
        sums = {"loss_sum": jnp.sum(losses * weight), "pairs": jnp.sum(weight)}
        sums.update({f"dpo/{name}_sum": jnp.sum(value * weight) for name, value in values.items()})
        return sums, state

    def loss(self, params, frozen, batch, model):
        sums, state = self._sums(params, frozen, batch, model)
        return self.objective(sums, state), sums

    def eval_sums(self, params, frozen, batch, model, constants):
        return self._sums(params, frozen, batch, model)[0]

    def eval_constants(self, data):
        return {}

    def eval_metrics(self, totals):
        pairs = max(totals["pairs"], 1.0)
        metrics = {"eval_loss": totals["loss_sum"] / pairs}
        metrics.update({f"eval_dpo/{name}": totals[f"dpo/{name}_sum"] / pairs for name in METRICS})
        metrics["eval_pairs"] = totals["pairs"]
        return metrics

    # ------------------------------------------------------------------ precomputed reference
    def prepare(self, data, setup, params, run_dir: Path, fresh: bool) -> None:
        """With `dpo.reference: precomputed`: the reference log-probabilities of every pair, computed
        from `params` when the run is `fresh` (before step 1) and saved, else read from the run.
        The file records the data's fingerprint and the parameters' norm: a fresh run reuses it only
        if both match (e.g. restarted before its first checkpoint), a resumed one requires the data's."""
        if not self.precomputed:
            return
        path, splits = run_dir / REFERENCE_FILE, (("train", "train"), ("val", "validation"))
        params_norm = float(optax.tree.norm(params))
        saved = {}
        if path.exists():
            with np.load(path) as file:
                saved = {key: file[key] for key in file.files}
        if saved and str(saved["fingerprint"]) != data.fingerprint:
            if not fresh:
                raise CheckpointError(f"{path}: computed for data {saved['fingerprint']}, the run now reads data {data.fingerprint}; "
                                      "the data changed since the run started: restore it or start a new run_dir")
            saved = {}
        if saved and fresh and not np.isclose(float(saved["params_norm"]), params_norm, rtol=1e-6):
            saved = {}  # a fresh start from other parameters (e.g. the init_from source has moved on)
        if not saved and not fresh:
            raise CheckpointError(f"{path} not found: the reference log-probabilities of the initial policy are computed before "
                                  "step 1 and cannot be recomputed from a later checkpoint; start the run again in a new run_dir")
        if not saved:
            saved = {name: self._precompute(getattr(data, split), setup, params) for name, split in splits}
            saved.update(fingerprint=np.asarray(data.fingerprint), params_norm=np.asarray(params_norm))
            if jax.process_index() == 0:
                buffer = io.BytesIO()
                np.savez(buffer, **saved)
                write_bytes_atomic(path, buffer.getvalue())
        for name, split in splits:
            setattr(data, split, getattr(data, split).with_reference(saved[name]))

    def _precompute(self, split, setup, params) -> np.ndarray:
        """[n_pairs, 2] log-probabilities of the chosen and rejected responses under `params`."""
        keys = [f"{side}_{key}" for side in SIDES for key in (*FIELDS, "loss_mask")]
        shardings = {key: setup.batch_shardings[key] for key in keys}
        compute = jax.jit(lambda p, b: response_logps(setup.model, p, b)[0],
                          in_shardings=(setup.factory.shardings.params, shardings), out_shardings=NamedSharding(setup.mesh, P()))
        batch_size, reference = self.cfg.data.global_batch_size, np.zeros((split.num_examples, 2), np.float32)
        host_rows = host_slice(batch_size, jax.process_index(), jax.process_count())
        for start in range(0, split.num_rows, batch_size):
            rows = np.arange(start, start + batch_size)
            rows = np.where(rows < split.num_rows, rows, -1)
            host = {key: value for key, value in split.rows(rows[host_rows], 0).items() if key in shardings}
            logps = np.asarray(jax.device_get(compute(params, host_batch_to_global(host, shardings))))  # [B, 2, L]
            pairs, row, slot = split.pair_slots(rows)
            reference[pairs] = logps[row, :, slot]
        return reference

"""Mixture-of-experts feed-forward layer: router, experts, dispatch/combine, auxiliary losses.

    y_BTD = MoEFeedForward(config, decode)(x_BTD, positions_BT, segment_ids_BT)   # in place of layers.MLP

positions and segment_ids as DecoderLM takes them (documents packed in a row have their own
segment ids and positions from 0; default: one document per row at positions 0, 1, ...). Shape
suffixes as in layers.py, plus E experts, X experts held by one shard, k experts per token (top_k),
N tokens, M = N * top_k routing assignments.

Router, in float32: logits = x @ router; scores = softmax(logits) or sigmoid(logits); each token
goes to its top_k experts with weights = their scores, divided by their sum when `renormalize`
(for softmax that is Mixtral's softmax over the selected logits). Experts are SwiGLU MLPs of width
`d_ff_expert` (gate/up [E, D, F], down [E, F, D], logical axes 'expert', 'embed', 'mlp'). Shared
experts are one dense SwiGLU of width n_shared_experts * d_ff_expert that every token goes through.

Dispatch (`model.moe.dispatch`):
- dropless: assignments sorted by expert and run through grouped matmuls (`jax.lax.ragged_dot`).
- capacity (GShard, Switch), counted per document: a document's tokens fall in groups of
  G = `capacity_group` positions (group = position // G, counted from the document's start), and
  expert e serves at most C = min(G, ceil(top_k * G * capacity_factor / E)) assignments of a group.
  Assignments are served in token order, a token's choices in rank order: the j-th choice of token
  t is kept when fewer than C assignments of earlier tokens of t's group, or of better choices of
  t, went to the same expert. A dropped assignment adds nothing (the residual stream carries the
  token). So only the document's own tokens and positions decide what drops: not its neighbours in
  a packed row, not the row's or the document's length, and not later tokens (the layer stays
  causal). A decoding call (`decode`, the KV-cache calls of generate.py) never drops: it runs
  dropless, which equals capacity mode whenever capacity mode drops nothing. The kept assignments
  run through the dropless path: with capacity per document, a row of many short documents can
  keep every assignment, so a fixed-size buffer per expert (GShard's one-hot dispatch) would need
  a slot per token of the row to be exact, E x T slots against top_k x T sorted assignments.

Expert parallelism, when the 'expert' logical axis maps to mesh axes of size > 1 (both modes): a
shard_map over the batch axes. Tokens are all-gathered over the expert axes, each shard runs its
own experts on the assignments routed to them, and a reduce-scatter returns each token's sum
(Megatron-LM's "allgather" token dispatcher). An all-to-all would move top_k / ep of these bytes,
but needs a variable-size exchange (`ragged_all_to_all`), which XLA:CPU cannot run.

Statistics of every MoE layer (expert load = fraction of assignments per expert before dropping,
dropped fraction, load-balancing and z-loss values) are sown into the 'intermediates' collection
under `STATS`; `aux_loss_and_metrics` turns them into the objective's auxiliary loss and metrics.
The statistics cover every token of the batch, padding included.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lmjax.config import ModelConfig, MoEConfig
from lmjax.models.activations import swiglu
from lmjax.models.layers import MLP, init_std, partitioned_normal

STATS = "moe_stats"  # name of the sown statistics in the 'intermediates' collection


def expert_capacity(moe: MoEConfig) -> int:
    """C: assignments one expert serves per capacity group (an expert never gets more than one
    assignment per token, so more than `capacity_group` would never be used)."""
    group = moe.capacity_group
    return max(1, min(group, math.ceil(moe.top_k * group * moe.capacity_factor / moe.n_experts)))


# ----------------------------------------------------------------------------- router and aux losses


def route(logits_NE: jax.Array, moe: MoEConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float32 router logits -> (weights_Nk, experts_Nk, probs_NE); probs sum to 1 per token
    (sigmoid scores are normalised for the load-balancing loss, as in DeepSeek-V3)."""
    logits_NE = logits_NE.astype(jnp.float32)
    if moe.router_scores == "softmax":
        scores_NE = jax.nn.softmax(logits_NE, axis=-1)
        probs_NE = scores_NE
    else:
        scores_NE = jax.nn.sigmoid(logits_NE)
        probs_NE = scores_NE / jnp.sum(scores_NE, axis=-1, keepdims=True)
    weights_Nk, experts_Nk = jax.lax.top_k(scores_NE, moe.top_k)
    if moe.renormalize:
        weights_Nk = weights_Nk / jnp.sum(weights_Nk, axis=-1, keepdims=True)
    return weights_Nk, experts_Nk, probs_NE


def expert_load(experts_Nk: jax.Array, n_experts: int) -> jax.Array:
    """f_E: fraction of the routing assignments that chose each expert (sums to 1)."""
    counts_E = jnp.sum(jax.nn.one_hot(experts_Nk, n_experts, dtype=jnp.float32), axis=tuple(range(experts_Nk.ndim)))
    return counts_E / experts_Nk.size


def load_balancing_loss(probs_NE: jax.Array, experts_Nk: jax.Array) -> jax.Array:
    """Switch Transformer (Fedus et al. 2021, eq. 4) without alpha: E * sum_i f_i * P_i.

    1 when the assignments or the mean probabilities are uniform, up to E when one expert takes
    everything. Gradients flow through P (the router probabilities); f is a count.
    """
    n_experts = probs_NE.shape[-1]
    mean_probs_E = jnp.mean(probs_NE.reshape(-1, n_experts), axis=0)
    return n_experts * jnp.sum(expert_load(experts_Nk, n_experts) * mean_probs_E)


def router_z_loss(logits_NE: jax.Array) -> jax.Array:
    """ST-MoE (Zoph et al. 2022, eq. 5) without its coefficient: mean of logsumexp(logits)^2."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_NE.astype(jnp.float32), axis=-1)))


def aux_loss_and_metrics(stats: dict[str, jax.Array], config: ModelConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sown statistics stacked over the MoE layers (leading axis in `layer_indices` order) ->
    (auxiliary loss summed over MoE layers, metrics: averages over MoE layers + per-layer load)."""
    moe = config.moe
    lb_L, z_L = stats["load_balance_loss"], stats["router_z_loss"]
    aux = moe.load_balance_loss * jnp.sum(lb_L) + moe.router_z_loss * jnp.sum(z_L)
    metrics = {
        "moe/aux_loss": aux,
        "moe/load_balance_loss": jnp.mean(lb_L),
        "moe/router_z_loss": jnp.mean(z_L),
        "moe/dropped_fraction": jnp.mean(stats["dropped_fraction"]),
    }
    for i, layer in enumerate(moe.layer_indices(config.n_layers)):
        metrics[f"moe/expert_load/layer{layer}"] = stats["expert_load"][i]
    return aux, metrics


# ----------------------------------------------------------------------------- expert computation


def capacity_kept(experts_BTk: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array, moe: MoEConfig) -> jax.Array:
    """kept_BTk: the assignments capacity mode serves, by the per-document rule in the module
    docstring."""
    batch, length, top_k = experts_BTk.shape
    group_BT = positions_BT // moe.capacity_group
    # A group starts at the row start and wherever the segment or the position group changes.
    changed_BT = (segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]) | (group_BT[:, 1:] != group_BT[:, :-1])
    starts_BT = jnp.concatenate([jnp.ones((batch, 1), bool), changed_BT], axis=1)
    chosen_BTkE = jax.nn.one_hot(experts_BTk, moe.n_experts, dtype=jnp.int32)
    # Flattening (T, k) puts assignments in token order, a token's choices in rank order; the
    # running count per expert, less its value where the group started, is the rank in the group.
    running_BTkE = jnp.cumsum(chosen_BTkE.reshape(batch, length * top_k, -1), axis=1).reshape(chosen_BTkE.shape)
    before_BTE = running_BTkE[:, :, 0] - chosen_BTkE[:, :, 0]  # assignments of the earlier tokens
    # Running counts never decrease, so the cummax holds the count at the latest group start.
    group_base_BTE = jax.lax.cummax(jnp.where(starts_BT[..., None], before_BTE, 0), axis=1)
    rank_BTk = jnp.sum((running_BTkE - 1 - group_base_BTE[:, :, None]) * chosen_BTkE, axis=-1)
    return rank_BTk < expert_capacity(moe)


def _grouped_swiglu(x_ND, experts_Nk, weights_Nk, gate_XDF, up_XDF, down_XFD, first_expert) -> jax.Array:
    """Dropless experts first_expert .. first_expert + X - 1 on the tokens routed to them; the
    assignments to other experts (held by other shards, or E: dropped) add nothing."""
    n_tokens, top_k = experts_Nk.shape
    n_local = gate_XDF.shape[0]
    local_M = experts_Nk.reshape(-1) - first_expert
    is_local_M = (local_M >= 0) & (local_M < n_local)
    sort_key_M = jnp.where(is_local_M, local_M, n_local)  # other shards' assignments sort last
    order_M = jnp.argsort(sort_key_M, stable=True)
    group_sizes_X = jnp.bincount(sort_key_M, length=n_local + 1)[:n_local].astype(jnp.int32)
    x_MD = x_ND[order_M // top_k]
    h_MF = swiglu(jax.lax.ragged_dot(x_MD, gate_XDF, group_sizes_X), jax.lax.ragged_dot(x_MD, up_XDF, group_sizes_X))
    y_sorted_MD = jax.lax.ragged_dot(h_MF, down_XFD, group_sizes_X)
    # Rows past the last local group belong to no group; zero them whatever the kernel leaves there.
    in_group_M = jnp.arange(order_M.shape[0]) < jnp.sum(group_sizes_X)
    y_sorted_MD = jnp.where(in_group_M[:, None], y_sorted_MD, 0)
    y_MD = jnp.zeros_like(y_sorted_MD).at[order_M].set(y_sorted_MD)
    y_NkD = y_MD.reshape(n_tokens, top_k, -1).astype(jnp.float32)
    return jnp.einsum("nkd,nk->nd", y_NkD, weights_Nk.astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class _MeshLayout:
    """Mesh axes of the batch and expert dimensions under the active mesh and logical rules."""

    mesh: jax.sharding.AbstractMesh
    batch_axes: tuple[str, ...]
    expert_axes: tuple[str, ...]

    def size(self, axes: tuple[str, ...]) -> int:
        return math.prod(self.mesh.shape[a] for a in axes)


def _mesh_axes(logical: str) -> tuple[str, ...]:
    axes = nn.logical_to_mesh_axes((logical,))[0]
    if axes is None:
        return ()
    return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


def _active_layout() -> _MeshLayout | None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not nn.get_logical_axis_rules():
        return None  # unsharded: the constraints and the shard_map have nothing to do
    return _MeshLayout(mesh, _mesh_axes("batch"), _mesh_axes("expert"))


def _spec(*dims: tuple[str, ...]) -> P:
    return P(*(d if d else None for d in dims))


def _dropless_ffn(x_BTD, experts_BTk, weights_BTk, params, layout: _MeshLayout | None) -> jax.Array:
    batch, _, d_model = x_BTD.shape
    top_k = experts_BTk.shape[-1]

    def local(x_BTD, experts_BTk, weights_BTk, gate_XDF, up_XDF, down_XFD, first_expert=0):
        y_ND = _grouped_swiglu(
            x_BTD.reshape(-1, d_model), experts_BTk.reshape(-1, top_k), weights_BTk.reshape(-1, top_k),
            gate_XDF, up_XDF, down_XFD, first_expert,
        )
        return y_ND.reshape(*x_BTD.shape[:2], d_model)

    if layout is None or batch % layout.size(layout.batch_axes):
        # One program over the whole batch (also the fallback for batches that do not split evenly,
        # such as the batch of 1 used to create the parameters).
        return local(x_BTD, experts_BTk, weights_BTk, *params)

    # Expert axes that also shard the batch: gather their tokens, then reduce-scatter the sums.
    # Expert axes that do not shard the batch already see every token: sum over them.
    gather_axes = tuple(a for a in layout.expert_axes if a in layout.batch_axes)
    sum_axes = tuple(a for a in layout.expert_axes if a not in layout.batch_axes)

    def per_shard(x_BTD, experts_BTk, weights_BTk, gate_XDF, up_XDF, down_XFD):
        first_expert = jax.lax.axis_index(layout.expert_axes) * gate_XDF.shape[0] if layout.expert_axes else 0
        if gather_axes:
            x_BTD, experts_BTk, weights_BTk = (
                jax.lax.all_gather(a, gather_axes, axis=0, tiled=True) for a in (x_BTD, experts_BTk, weights_BTk)
            )
        y_BTD = local(x_BTD, experts_BTk, weights_BTk, gate_XDF, up_XDF, down_XFD, first_expert)
        if gather_axes:
            y_BTD = jax.lax.psum_scatter(y_BTD, gather_axes, scatter_dimension=0, tiled=True)
        if sum_axes:
            y_BTD = jax.lax.psum(y_BTD, sum_axes)
        return y_BTD

    tokens, experts = _spec(layout.batch_axes), _spec(layout.expert_axes)
    sharded = jax.shard_map(
        per_shard,
        mesh=layout.mesh,
        in_specs=(tokens, tokens, tokens, experts, experts, experts),
        out_specs=tokens,
        axis_names=set(layout.batch_axes) | set(layout.expert_axes),
    )
    return sharded(x_BTD, experts_BTk, weights_BTk, *params)


class MoEFeedForward(nn.Module):
    """Routed SwiGLU experts (+ optional shared experts); sows its router statistics under STATS."""

    config: ModelConfig
    decode: bool = False  # a KV-cache call (prefill or one step): never drops

    @nn.compact
    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array | None = None,
                 segment_ids_BT: jax.Array | None = None) -> jax.Array:
        cfg, moe = self.config, self.config.moe
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        batch, length, d_model = x_BTD.shape
        n_experts, d_ff = moe.n_experts, cfg.expert_d_ff

        router_DE = self.param("router", partitioned_normal(init_std(cfg, "router"), ("embed", None)), (d_model, n_experts), param_dtype)
        logits_BTE = jnp.einsum("btd,de->bte", x_BTD.astype(jnp.float32), router_DE.astype(jnp.float32))
        weights_BTk, experts_BTk, probs_BTE = route(logits_BTE, moe)

        def expert_param(name: str, shape: tuple[int, ...], axes: tuple[str, ...], std: float) -> jax.Array:
            return self.param(name, partitioned_normal(std, axes), shape, param_dtype).astype(dtype)

        params = (
            expert_param("gate", (n_experts, d_model, d_ff), ("expert", "embed", "mlp"), init_std(cfg, "mlp_in")),
            expert_param("up", (n_experts, d_model, d_ff), ("expert", "embed", "mlp"), init_std(cfg, "mlp_in")),
            expert_param("down", (n_experts, d_ff, d_model), ("expert", "mlp", "embed"), init_std(cfg, "mlp_out")),
        )
        x_BTD = x_BTD.astype(dtype)
        layout = _active_layout()
        served_BTk, dropped_fraction = experts_BTk, jnp.zeros((), jnp.float32)
        if moe.dispatch == "capacity" and not self.decode:
            if positions_BT is None:
                positions_BT = jnp.broadcast_to(jnp.arange(length), (batch, length))
            if segment_ids_BT is None:
                segment_ids_BT = jnp.ones((batch, length), jnp.int32)
            kept_BTk = capacity_kept(experts_BTk, positions_BT, segment_ids_BT, moe)
            served_BTk = jnp.where(kept_BTk, experts_BTk, n_experts)  # expert E: no shard's, adds nothing
            dropped_fraction = jnp.mean(jnp.logical_not(kept_BTk).astype(jnp.float32))
        y_BTD = _dropless_ffn(x_BTD, served_BTk, weights_BTk, params, layout)
        y_BTD = nn.with_logical_constraint(y_BTD.astype(dtype), ("batch", "length", "embed"))

        if moe.n_shared_experts:
            shared_cfg = dataclasses.replace(cfg, d_ff=moe.n_shared_experts * d_ff)
            y_BTD = y_BTD + MLP(shared_cfg, name="shared")(x_BTD)

        self.sow(
            "intermediates",
            STATS,
            {
                "expert_load": expert_load(experts_BTk, n_experts),
                "load_balance_loss": load_balancing_loss(probs_BTE, experts_BTk),
                "router_z_loss": router_z_loss(logits_BTE),
                "dropped_fraction": dropped_fraction,
            },
        )
        return y_BTD

"""Decoder-only language model, Llama or GPT-2 style, with dense or mixture-of-experts FFNs.

    logits_BTV = DecoderLM(config).apply({"params": params}, tokens, positions, segment_ids)

tokens int [B, T]; positions int [B, T] (default arange(T) per row); segment_ids int
[B, T] (default: one segment per row). Several documents may be packed in a row with segment ids
1, 2, 3, ... and positions restarting at 0 for each; 0 marks padding. A token attends to tokens at
earlier-or-equal indices of its own segment only, the `model.sliding_window` most recent when set
(padding attends to padding, so padding rows stay finite). Returns float32 logits [B, T, vocab_size].

    ce_BT, log_z_BT = DecoderLM(config).apply({"params": params}, tokens, positions, segment_ids, targets=targets)

With `model.loss_chunk_tokens` set, int `targets` [B, T] make it return the per-token cross-entropy
and log-partition (float32 [B, T] each) instead, computed with the readout in chunks of tokens, so
no [B, T, V] logits are kept for the backward pass (fused_cross_entropy.py); same parameters.

    loss, ce_BT, log_z_BT = DecoderLM(config).apply(..., targets=targets, target_weights=mask_BT, z_loss=z)

Training's form of the same: with float `target_weights` [B, T] it also returns the scalar
sum(mask (ce + z log_z^2)), whose gradients are computed in the forward pass (one matmul fewer);
ce and log_z then carry no gradient.

Parameter tree: `embed/embedding` [V, D]; without RoPE (`model.positions`) `position_embedding`
[max_seq_len, D]; the
blocks are `layers/...` with a leading [n_layers] axis when `config.scan_layers` (logical name
'layers'), else `layer_0/...`, `layer_1/...`; then `final_norm/...` and, unless
`tie_embeddings`, `unembed` [D, V]. With `family: moe` (Llama style) the MoE layers
(`config.moe.layer_indices`) replace the MLP by `moe.MoEFeedForward`; scanned, the blocks are
`dense_layers/...` [first_dense_layers] and `moe_layers/{dense_0, ..., moe}/...` [number of MoE
layers], one group per MoE layer; unrolled, `layer_i/mlp` is the MLP or the MoE layer.
Init: matrices and tables normal(init_std), except the attention and MLP output projections, normal(init_std / sqrt(2 * n_layers)) as in GPT-2; norm
scales 1, biases 0. With `model.parameterization: mup` the hidden matrices (attention, MLP, experts, router) start
from std * sqrt(base / width) and the logits are multiplied by base / width (lmjax/models/mup.py).

Decoding: `decode=True` reads and writes the 'cache' collection made by `init_cache`, so a call
with the prompt followed by one call per new token reproduces the full forward pass. Positions
default to the number of tokens already cached + arange(T). While decoding a row holds one
sequence, and segment_ids (default all real) mark left padding: 0 = a pad token, whose key no
later token attends to, so prompts of different lengths share a batch, left-padded, each row
giving its real tokens positions 0, 1, ... (generate.py); any other id is a real token.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax import flops
from lmjax.config import ModelConfig
from lmjax.models.layers import (
    MLP,
    RESIDUAL_AXES,
    Block,
    Embed,
    LanguageModel,
    ModelInputError,
    learned_positions,
    make_norm,
    output_logits,
)
from lmjax.models.fused_cross_entropy import output_cross_entropy
from lmjax.models.moe import STATS, MoEFeedForward, aux_loss_and_metrics
from lmjax.models.stacking import block_class, run_layer, scan_stack

# Names a model may sow at its top level in the 'intermediates' collection; a task adds
# AUX_LOSS (a per-token scalar) to its objective and logs AUX_METRICS (a dict of per-token
# averages). This is the whole contract between a model's auxiliary losses and the trainer.
AUX_LOSS, AUX_METRICS = "aux_loss", "aux_metrics"


class MoELayerGroup(nn.Module):
    """`moe.interval - 1` dense blocks (`dense_0`, ...) then one MoE block (`moe`): the unit the
    scanned MoE stack repeats. Returns (x, None) like Block."""

    config: ModelConfig
    block_cls: type[nn.Module] = Block  # Block, or Block under nn.remat
    decode: bool = False

    @nn.compact
    def __call__(
        self, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array | None
    ) -> tuple[jax.Array, None]:
        cfg = self.config
        for j in range(cfg.moe.interval - 1):
            x_BTD, _ = self.block_cls(cfg, decode=self.decode, name=f"dense_{j}")(x_BTD, positions_BT, segment_ids_BT)
        moe_block = self.block_cls(cfg, decode=self.decode, mlp_cls=MoEFeedForward, name="moe")
        return moe_block(x_BTD, positions_BT, segment_ids_BT)


class DecoderLM(LanguageModel):
    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        decode: bool = False,
        *,
        targets: jax.Array | None = None,
        target_weights: jax.Array | None = None,
        z_loss: float = 0.0,
    ) -> jax.Array | tuple[jax.Array, ...]:
        cfg = self.config
        self._check_inputs(tokens, positions, segment_ids, decode, targets)
        if target_weights is not None and (targets is None or target_weights.shape != targets.shape):
            raise ModelInputError(f"target_weights: expected targets of the same shape, got {target_weights.shape} "
                                  f"and {None if targets is None else targets.shape}")
        tokens_BT, positions_BT, segment_ids_BT = tokens, positions, segment_ids
        batch, length = tokens_BT.shape
        first_position = self._count_decoded_tokens(length) if decode else 0
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(first_position + jnp.arange(length), (batch, length))

        embed = Embed(cfg, name="embed")
        x_BTD = embed(tokens_BT)
        if not cfg.use_rope:
            x_BTD = x_BTD + learned_positions(self, cfg, positions_BT)
        x_BTD = nn.with_logical_constraint(x_BTD, RESIDUAL_AXES)

        x_BTD = self._blocks(x_BTD, positions_BT, segment_ids_BT, decode)
        if cfg.family == "moe" and self.is_mutable_collection("intermediates"):
            aux_loss, aux_metrics = moe_aux_loss(self.variables["intermediates"], cfg)
            self.sow("intermediates", AUX_LOSS, aux_loss)
            self.sow("intermediates", AUX_METRICS, aux_metrics)

        x_BTD = make_norm(cfg, "final_norm")(x_BTD)
        if targets is not None:
            return output_cross_entropy(self, cfg, embed, x_BTD, targets, target_weights, z_loss)
        return output_logits(self, cfg, embed, x_BTD)

    def _blocks(self, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array | None, decode: bool) -> jax.Array:
        cfg = self.config
        block_cls = block_class(cfg, decode)
        moe_layers = cfg.moe.layer_indices(cfg.n_layers) if cfg.family == "moe" else ()
        if not cfg.scan_layers:
            for i in range(cfg.n_layers):
                block = block_cls(cfg, decode=decode, mlp_cls=MoEFeedForward if i in moe_layers else MLP, name=f"layer_{i}")
                x_BTD, _ = run_layer(cfg, block, x_BTD, positions_BT, segment_ids_BT)
            return x_BTD
        if not moe_layers:
            stacks = [scan_stack(block_cls, cfg.n_layers)(cfg, decode=decode, name="layers")]
        else:
            # nn.scan needs identical layers: the dense prefix is one stack, the repeated group
            # (interval - 1 dense blocks, then an MoE block) another.
            stacks = [scan_stack(MoELayerGroup, len(moe_layers))(cfg, block_cls, decode=decode, name="moe_layers")]
            if cfg.moe.first_dense_layers:
                stacks.insert(0, scan_stack(block_cls, cfg.moe.first_dense_layers)(cfg, decode=decode, name="dense_layers"))
        for stack in stacks:
            x_BTD, _ = stack(x_BTD, positions_BT, segment_ids_BT)
        return x_BTD

    def _count_decoded_tokens(self, length: int) -> jax.Array:
        """Tokens cached before this call (a model-level counter, the default first position)."""
        initialized = self.has_variable("cache", "cache_index")
        cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        start = cache_index.value
        if initialized:
            cache_index.value = start + length
        return start

    def _check_inputs(self, tokens_BT, positions_BT, segment_ids_BT, decode: bool, targets_BT) -> None:
        cfg = self.config
        if tokens_BT.ndim != 2 or not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
            raise ModelInputError(f"tokens: expected an integer array [batch, length], got {tokens_BT.dtype} {tokens_BT.shape}")
        if targets_BT is not None and (cfg.loss_chunk_tokens is None or decode):
            raise ModelInputError("targets: the fused cross-entropy needs model.loss_chunk_tokens set and decode=False")
        for name, array in (("positions", positions_BT), ("segment_ids", segment_ids_BT), ("targets", targets_BT)):
            if array is not None and array.shape != tokens_BT.shape:
                raise ModelInputError(f"{name}: expected shape {tokens_BT.shape} (as tokens), got {array.shape}")
        if not cfg.use_rope and not decode and tokens_BT.shape[1] > cfg.max_seq_len:
            raise ModelInputError(f"tokens: length {tokens_BT.shape[1]} exceeds model.max_seq_len ({cfg.max_seq_len})")


def moe_aux_loss(intermediates: dict, config: ModelConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(auxiliary loss, metrics) of the MoE layers from the statistics they sowed in the
    'intermediates' collection of a forward pass."""
    if config.scan_layers:  # one entry stacked over the MoE groups, in layer order
        stats = intermediates["moe_layers"]["moe"]["mlp"][STATS][0]
    else:
        per_layer = [intermediates[f"layer_{i}"]["mlp"][STATS][0] for i in config.moe.layer_indices(config.n_layers)]
        stats = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    return aux_loss_and_metrics(stats, config)


def init_cache(model: DecoderLM, batch_size: int, max_length: int) -> dict:
    """Zeroed 'cache' collection for decoding up to `max_length` tokens per row (prompt included).

    Per layer: cached_key/cached_value [batch, max_length, kv_heads, head_dim] in the compute dtype,
    cached_valid [batch, max_length] (False: padding or not written yet) and cache_index (stacked on
    a leading layer axis with scan_layers). Built from shapes only: no parameters are materialised.
    """
    tokens = jnp.zeros((batch_size, max_length), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, decode=True))["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


# ----------------------------------------------------------------------------- counts (lmjax.flops)


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """See `lmjax.flops.param_counts`. MoE layers swap their MLP for a router [d, E], E routed and
    n_shared shared experts; `active` counts the top_k routed ones."""
    d = cfg.d_model
    block = flops.block_params(cfg)
    embedding, output_head = flops.embedding_params(cfg), flops.output_head_params(cfg)
    total = embedding + cfg.n_layers * sum(block.values()) + flops.norm_params(cfg) + output_head
    active = total
    if cfg.family == "moe":
        moe, n_moe_layers = cfg.moe, len(cfg.moe.layer_indices(cfg.n_layers))
        expert = cfg.mlp_matrices * d * cfg.expert_d_ff
        always_on = d * moe.n_experts + moe.n_shared_experts * expert
        total += n_moe_layers * (always_on + moe.n_experts * expert - block["mlp"])
        active += n_moe_layers * (always_on + moe.top_k * expert - block["mlp"])
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding, "output_head": output_head, "active": active}


def forward_terms(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Appendix-F terms of one sequence. MoE layers count their router and the top_k routed +
    shared experts each token uses (the model's FLOPs: capacity padding and dropped tokens are not
    counted)."""
    terms = flops.chinchilla_forward_terms(
        seq_len, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.head_size, cfg.d_ff, cfg.vocab_size,
        n_kv_heads=cfg.kv_heads, mlp_matrices=cfg.mlp_matrices,
    )
    if cfg.family == "moe":
        moe, n_moe_layers = cfg.moe, len(cfg.moe.layer_indices(cfg.n_layers))
        seq, d = float(seq_len), float(cfg.d_model)
        terms["mlp"] = (cfg.n_layers - n_moe_layers) * 2 * seq * cfg.mlp_matrices * d * cfg.d_ff
        terms["moe_router"] = n_moe_layers * 2 * seq * d * moe.n_experts
        terms["moe_experts"] = n_moe_layers * (moe.top_k + moe.n_shared_experts) * 2 * seq * cfg.mlp_matrices * d * cfg.expert_d_ff
    return terms

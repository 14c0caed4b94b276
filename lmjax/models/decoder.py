"""Decoder-only language model, Llama or GPT-2 style, with dense or mixture-of-experts FFNs.

    logits_BTV = DecoderLM(config).apply({"params": params}, tokens, positions, segment_ids)

tokens int [B, T]; positions int [B, T] (default arange(T) per row); segment_ids int
[B, T] (default: one segment per row). Several documents may be packed in a row with segment ids
1, 2, 3, ... and positions restarting at 0 for each; 0 marks padding. A token attends to tokens at
earlier-or-equal indices of its own segment only (padding attends to padding, so padding rows
stay finite). Returns float32 logits [B, T, vocab_size].

Parameter tree: `embed/embedding` [V, D]; gpt2 adds `position_embedding` [max_seq_len, D]; the
blocks are `layers/...` with a leading [n_layers] axis when `config.scan_layers` (logical name
'layers'), else `layer_0/...`, `layer_1/...`; then `final_norm/...` and, unless
`tie_embeddings`, `unembed` [D, V]. With `family: moe` (Llama style) the MoE layers
(`config.moe.layer_indices`) replace the MLP by `moe.MoEFeedForward`; scanned, the blocks are
`dense_layers/...` [first_dense_layers] and `moe_layers/{dense_0, ..., moe}/...` [number of MoE
layers], one group per MoE layer; unrolled, `layer_i/mlp` is the MLP or the MoE layer.
Init: matrices and tables normal(init_std), except the attention and MLP output projections, normal(init_std / sqrt(2 * n_layers)) as in GPT-2; norm
scales 1, biases 0.

Decoding: `decode=True` reads and writes the 'cache' collection made by `init_cache`, so a call
with the prompt followed by one call per new token reproduces the full forward pass. Positions
default to the number of tokens already cached + arange(T).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax.config import ModelConfig
from lmjax.errors import UserError
from lmjax.models.layers import MLP, RESIDUAL_AXES, Block, make_norm, partitioned_normal
from lmjax.models.moe import STATS, MoEFeedForward, aux_loss_and_metrics

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # Saves weight matmul outputs; recomputes norms, activations and attention (whose einsums have
    # batch dimensions, so the [B, N, T, T] scores are never stored).
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class ModelInputError(UserError):
    """Inputs of the wrong rank, length or kind for the model."""


def lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """Rows of a (possibly sharded) table. The table is all-gathered first, as FSDP does for every
    weight: a gather from a vocab-sharded table otherwise makes XLA's partitioner replicate it the
    slow way ("involuntary full rematerialization")."""
    return jnp.take(nn.with_logical_constraint(table, (None, None)), ids, axis=0)


class Embed(nn.Module):
    """Token embedding table [V, D]; `attend` reuses it as the tied unembedding."""

    config: ModelConfig

    def setup(self) -> None:
        cfg = self.config
        self.embedding = self.param(
            "embedding", partitioned_normal(cfg.init_std, ("vocab", "embed")), (cfg.vocab_size, cfg.d_model), jnp.dtype(cfg.param_dtype)
        )

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        return lookup(self.embedding, tokens_BT).astype(jnp.dtype(self.config.dtype))

    def attend(self, x_BTD: jax.Array) -> jax.Array:
        table_VD = self.embedding.astype(jnp.dtype(self.config.dtype))
        return jnp.einsum("btd,vd->btv", x_BTD, table_VD, preferred_element_type=jnp.float32)


def _scan(module_cls: type[nn.Module], length: int) -> type[nn.Module]:
    """`length` copies of `module_cls` stacked on a leading 'layers' axis (params, KV cache and
    sown MoE statistics alike), run by one compiled loop body."""
    return nn.scan(
        module_cls,
        variable_axes={"params": 0, "cache": 0, "intermediates": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


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


class DecoderLM(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        decode: bool = False,
    ) -> jax.Array:
        cfg = self.config
        self._check_inputs(tokens, positions, segment_ids, decode)
        tokens_BT, positions_BT, segment_ids_BT = tokens, positions, segment_ids
        batch, length = tokens_BT.shape
        first_position = self._count_decoded_tokens(length) if decode else 0
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(first_position + jnp.arange(length), (batch, length))

        embed = Embed(cfg, name="embed")
        x_BTD = embed(tokens_BT)
        if cfg.style == "gpt2":
            table_init = partitioned_normal(cfg.init_std, (None, "embed"))
            table = self.param("position_embedding", table_init, (cfg.max_seq_len, cfg.d_model), jnp.dtype(cfg.param_dtype))
            x_BTD = x_BTD + lookup(table, positions_BT).astype(x_BTD.dtype)
        x_BTD = nn.with_logical_constraint(x_BTD, RESIDUAL_AXES)

        x_BTD = self._blocks(x_BTD, positions_BT, segment_ids_BT, decode)

        x_BTD = make_norm(cfg, "final_norm")(x_BTD)
        if cfg.tie_embeddings:
            logits_BTV = embed.attend(x_BTD)
        else:
            unembed_init = partitioned_normal(cfg.init_std, ("embed", "vocab"))
            unembed_DV = self.param("unembed", unembed_init, (cfg.d_model, cfg.vocab_size), jnp.dtype(cfg.param_dtype))
            logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, unembed_DV.astype(x_BTD.dtype), preferred_element_type=jnp.float32)
        return nn.with_logical_constraint(logits_BTV.astype(jnp.float32), ("batch", "length", "vocab"))

    def _blocks(self, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array | None, decode: bool) -> jax.Array:
        cfg = self.config
        block_cls = Block
        if cfg.remat != "none" and not decode:  # nothing to save for a backward pass when decoding
            # Inside nn.scan the loop already stops XLA from merging the recomputation with the
            # forward pass, so the CSE barrier is only needed for the unrolled loop.
            block_cls = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        moe_layers = cfg.moe.layer_indices(cfg.n_layers) if cfg.family == "moe" else ()
        if not cfg.scan_layers:
            for i in range(cfg.n_layers):
                block = block_cls(cfg, decode=decode, mlp_cls=MoEFeedForward if i in moe_layers else MLP, name=f"layer_{i}")
                x_BTD, _ = block(x_BTD, positions_BT, segment_ids_BT)
            return x_BTD
        if not moe_layers:
            stacks = [_scan(block_cls, cfg.n_layers)(cfg, decode=decode, name="layers")]
        else:
            # nn.scan needs identical layers: the dense prefix is one stack, the repeated group
            # (interval - 1 dense blocks, then an MoE block) another.
            stacks = [_scan(MoELayerGroup, len(moe_layers))(cfg, block_cls, decode=decode, name="moe_layers")]
            if cfg.moe.first_dense_layers:
                stacks.insert(0, _scan(block_cls, cfg.moe.first_dense_layers)(cfg, decode=decode, name="dense_layers"))
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

    def _check_inputs(self, tokens_BT, positions_BT, segment_ids_BT, decode: bool) -> None:
        cfg = self.config
        if tokens_BT.ndim != 2 or not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
            raise ModelInputError(f"tokens: expected an integer array [batch, length], got {tokens_BT.dtype} {tokens_BT.shape}")
        for name, array in (("positions", positions_BT), ("segment_ids", segment_ids_BT)):
            if array is not None and array.shape != tokens_BT.shape:
                raise ModelInputError(f"{name}: expected shape {tokens_BT.shape} (as tokens), got {array.shape}")
        if decode and segment_ids_BT is not None:
            raise ModelInputError("segment_ids: must be None with decode=True (one sequence per row while decoding)")
        if cfg.style == "gpt2" and not decode and tokens_BT.shape[1] > cfg.max_seq_len:
            raise ModelInputError(f"tokens: length {tokens_BT.shape[1]} exceeds model.max_seq_len ({cfg.max_seq_len})")


def moe_aux_loss(intermediates: dict, config: ModelConfig) -> tuple[jax.Array, dict[str, jax.Array]] | None:
    """(auxiliary loss, metrics) of the MoE layers from the 'intermediates' collection of a forward
    pass (`model.apply(..., mutable=["intermediates"])`); None for a dense model."""
    if config.family != "moe":
        return None
    if config.scan_layers:  # one entry stacked over the MoE groups, in layer order
        stats = intermediates["moe_layers"]["moe"]["mlp"][STATS][0]
    else:
        per_layer = [intermediates[f"layer_{i}"]["mlp"][STATS][0] for i in config.moe.layer_indices(config.n_layers)]
        stats = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    return aux_loss_and_metrics(stats, config)


def init_cache(model: DecoderLM, batch_size: int, max_length: int) -> dict:
    """Zeroed 'cache' collection for decoding up to `max_length` tokens per row (prompt included).

    Per layer: cached_key/cached_value [batch, max_length, kv_heads, head_dim] in the compute dtype
    and cache_index (stacked on a leading layer axis with scan_layers). Built from shapes only:
    no parameters are materialised.
    """
    tokens = jnp.zeros((batch_size, max_length), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, decode=True))["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

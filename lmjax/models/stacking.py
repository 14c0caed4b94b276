"""How a model's layers are stacked: activation checkpointing (`model.remat`), one compiled loop
body over scanned layers (`model.scan_layers: true`), or unrolled layers whose recomputation is held
back until their backward (`run_layer`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax.config import ModelConfig
from lmjax.models import cpu_matmul
from lmjax.models.flash_attention import ATTENTION_LSE, ATTENTION_OUT
from lmjax.models.layers import MLP, Block


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # Saves weight matmul outputs (XLA's dots, and the MKL kernel's by name) and blockwise attention's
    # output and logsumexp (linear in T);
    # recomputes norms, RoPE and activations. Attention's score einsums have batch dimensions, so the
    # [B, N, T, T] scores are never stored.
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT, ATTENTION_LSE, cpu_matmul.DENSE_OUT)),
}


def block_class(config: ModelConfig, decode: bool = False, block: type[nn.Module] = Block) -> type[nn.Module]:
    """`block` (default Block), under `nn.remat` when `config.remat` asks for it (never when
    decoding: there is no backward pass to save for)."""
    if config.remat == "none" or decode:
        return block
    # Inside nn.scan the loop already stops XLA from merging the recomputation with the forward
    # pass, so the CSE barrier is only needed for the unrolled loop.
    return nn.remat(block, policy=REMAT_POLICIES[config.remat], prevent_cse=not config.scan_layers)


def run_layer(config: ModelConfig, block: nn.Module, *args):
    """Calls one layer of an unrolled stack, `block(*args)`; under remat its backward recomputation
    waits for the layer's cotangent.

    XLA schedules an unrolled model's recomputation (norms, SwiGLU's sigmoid: element-wise work on
    the saved activations) as soon as those activations exist, in the forward pass, and keeps the
    results of every layer alive until the backward reaches it (bench_cpu: ~220 MiB more than the
    scanned model, whose loop body keeps it local). An optimization barrier does not stop that on
    XLA:CPU; a data dependency does: the saved values gain a zero taken from the cotangent, an add
    that fuses into their element-wise uses. Attention heads ([B, T, N, H], the only 4-d values
    saved) are left as they are: the attention backward that reads them needs the cotangent anyway,
    and the CPU kernel would read the add as a copy (bench_cpu: 24 copies of 6 MiB per step). A NaN
    or inf in the cotangent's first entry reaches every gradient through the matmuls anyway."""
    if config.remat == "none" or getattr(block, "decode", False) or getattr(block, "mlp_cls", MLP) is not MLP:
        return block(*args)  # no recomputation to order; MoE layers sow statistics, which custom_vjp does not carry
    return nn.custom_vjp(_call_layer, forward_fn=_layer_forward, backward_fn=_layer_backward)(block, *args)


def _call_layer(block: nn.Module, *args):
    return block(*args)


def _layer_forward(block: nn.Module, *args):
    return nn.vjp(_call_layer, block, *args)  # the vjp function: a pytree of the saved values


def _layer_backward(vjp_fn, cotangent):
    x_cotangent, _ = cotangent  # a layer returns (x, None)
    zero = x_cotangent.reshape(-1)[0] * 0
    vjp_fn = jax.tree.map(lambda r: r + zero.astype(r.dtype) if jnp.issubdtype(r.dtype, jnp.floating) and r.ndim < 4 else r, vjp_fn)
    return vjp_fn(cotangent)


def scan_stack(module_cls: type[nn.Module], length: int) -> type[nn.Module]:
    """`length` copies of `module_cls` stacked on a leading 'layers' axis (params, KV cache and
    sown statistics alike), run by one compiled loop body."""
    return nn.scan(
        module_cls,
        variable_axes={"params": 0, "cache": 0, "intermediates": 0},
        split_rngs={"params": True},
        in_axes=nn.broadcast,  # every argument but the carry (positions, segment ids, biases, ...)
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )

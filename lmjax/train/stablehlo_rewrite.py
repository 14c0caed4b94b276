"""Rewrites of the lowered train step (StableHLO) before XLA compiles it, for what XLA:CPU does not
simplify itself.

`drop_identity_reduce_precision`: jax's activation checkpointing rounds every saved residual to its own
dtype (`reduce_precision` with the dtype's exponent and mantissa bits; jax PR 22244), so that a value
recomputed in the backward cannot differ from the forward's through excess precision. For float32
that rounding is the identity, but XLA:CPU keeps the op: where the residual comes from a custom call
(the MKL matmul, the attention kernel) it runs as a copy of its own, and both copies stay alive
(bench_cpu, `remat: dots`: 30 copies per step, ~1% of the step and 38-68 MiB of peak RSS;
experiments/bench/README.md, fifteenth round). Only float32 is touched, where the op changes no bit;
for bfloat16 or float16 the rounding is what stops XLA's excess precision, and stays.
"""

from __future__ import annotations

from jax.extend.mlir import ir

REDUCE_PRECISION = "stablehlo.reduce_precision"
FLOAT32_FORMAT = (8, 23)  # exponent and mantissa bits of float32: jnp.finfo(jnp.float32).nexp, .nmant


def drop_identity_reduce_precision(module: ir.Module) -> int:
    """Removes, in place, each float32 `reduce_precision` to float32's own format (its uses read its
    operand instead); returns how many it removed."""
    identities = []

    def visit(op: ir.Operation) -> ir.WalkResult:
        if op.name == REDUCE_PRECISION and _is_float32_identity(op):
            identities.append(op)
        return ir.WalkResult.ADVANCE

    module.operation.walk(visit)
    for op in identities:  # after the walk: erasing while walking would invalidate it
        op.results[0].replace_all_uses_with(op.operands[0])
        op.erase()
    return len(identities)


def _is_float32_identity(op: ir.Operation) -> bool:
    element_type = str(ir.ShapedType(op.operands[0].type).element_type)
    bits = tuple(ir.IntegerAttr(op.attributes[name]).value for name in ("exponent_bits", "mantissa_bits"))
    return element_type == "f32" and bits == FLOAT32_FORMAT

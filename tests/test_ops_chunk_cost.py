"""The chunk form's cost structure, read from jaxprs at the benchmark shapes (tracing only: no
compilation, no arrays of that size are made).

XLA fuses a chain of elementwise ops into the op that consumes it, so an elementwise product
larger than the inputs (the chunk form's 8x8 diagonal blocks, its sums over up to 8 chunk
states) is computed inside the reduction that sums it, never stored, unless a matmul, a
data-movement op or a call boundary needs it whole. What is checked:
  - the arithmetic is in matmuls (dot_generals whose free sides and contraction are all at
    least 8 long): at least 80% of it (measured 84.5-89.6%), and under 1% in smaller
    dot_generals (measured 0-0.4%: the state scan's last blocks of fewer than 8 chunks; the form
    this replaced had 5.8% in 16.7M dot products of two vectors at the benchmark shape);
  - every value larger than the larger of 2x the largest input and 9/8 of the chunk states
    (K·M/C per step, which any chunked form keeps: 2x the input at K = M = 128, C = 64; the
    8-chunk blocks of the state scan add one row per block) comes from an elementwise or
    broadcasting op, and no matmul operand or result is that large;
  - the backward pass keeps only the op's inputs, in their own dtype (bf16 stays bf16).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from gsa_jax.ops import gated_linear_attention, gated_slot_attention

# The shapes of experiments/bench_kernels.py: (B, T, H, K = V, M).
BENCH_SHAPES = [(8, 2048, 16, 128, 64), (2, 8192, 16, 128, 64), (8, 2048, 4, 256, 64),
                (8, 2048, 16, 128, 128), (1, 65536, 16, 128, 64)]

MIN_MATMUL_SIDE = 8
MIN_MATMUL_SHARE = 0.80
MAX_SMALL_DOT_SHARE = 0.01
MAX_INPUT_RATIO = 2.0
MAX_STATE_RATIO = 9 / 8

# Ops whose (large) output XLA computes inside its consumer instead of storing it.
FUSIBLE = {"mul", "add", "add_any", "sub", "neg", "exp", "select_n", "max", "min", "div",
           "integer_pow", "broadcast_in_dim", "convert_element_type", "reshape", "squeeze",
           "expand_dims"}
REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "cumsum", "argmax"}


def _sub_jaxprs(params):
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jex_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jex_core.Jaxpr):
                yield item


def _equations(jaxpr):
    """(equation, whether it calls sub-jaxprs) over a jaxpr and all it calls."""
    for eqn in jaxpr.eqns:
        subs = list(_sub_jaxprs(eqn.params))
        yield eqn, bool(subs)
        for sub in subs:
            yield from _equations(sub)


def _nbytes(aval) -> int:
    return math.prod(aval.shape) * aval.dtype.itemsize


def _gsa_args(shape):
    B, T, H, K, M = shape
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # noqa: E731
    return (sds(B, T, H, K), sds(B, T, H, K), sds(B, T, H, K), sds(B, T, H, M), sds(B, T, H, M))


def _gsa_jaxprs(shape):
    """Jaxprs of the chunk form's forward and forward+backward (the benchmark's loss)."""
    args = _gsa_args(shape)
    cot = jax.ShapeDtypeStruct(args[0].shape, jnp.float32)

    def forward(*a):
        return gated_slot_attention(*a, impl="chunk")[0]

    def forward_backward(c, *a):
        loss = lambda *a: jnp.sum(forward(*a).astype(jnp.float32) * c)  # noqa: E731
        return jax.grad(loss, argnums=tuple(range(5)))(*a)

    largest_input = max(math.prod(a.shape) for a in args) * 4  # as float32, the compute dtype
    B, T, H, K, M = shape
    states = B * H * math.ceil(T / 64) * K * M * 4  # per pass (V = K), float32
    limit = max(MAX_INPUT_RATIO * largest_input, MAX_STATE_RATIO * states)
    return limit, {"forward": jax.make_jaxpr(forward)(*args).jaxpr,
                           "forward+backward": jax.make_jaxpr(forward_backward)(cot, *args).jaxpr}


def _cost(jaxpr):
    """(matmul FLOPs, smaller dot_generals' FLOPs, other arithmetic FLOPs)."""
    matmul, small, other = 0, 0, 0
    for eqn, calls in _equations(jaxpr):
        if calls:
            continue
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            contraction = math.prod(lhs[i] for i in lc)
            m = math.prod(d for i, d in enumerate(lhs) if i not in lc and i not in lb)
            n = math.prod(d for i, d in enumerate(rhs) if i not in rc and i not in rb)
            flops = 2 * math.prod(eqn.outvars[0].aval.shape) * contraction
            if min(m, n, contraction) >= MIN_MATMUL_SIDE:
                matmul += flops
            else:
                small += flops
        elif name in REDUCTIONS:
            other += math.prod(eqn.invars[0].aval.shape)
        elif name in FUSIBLE - {"broadcast_in_dim", "convert_element_type", "reshape",
                                "squeeze", "expand_dims"}:
            other += math.prod(eqn.outvars[0].aval.shape)
    return matmul, small, other


@pytest.mark.parametrize("shape", BENCH_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_chunk_arithmetic_is_in_matmuls(shape):
    _, jaxprs = _gsa_jaxprs(shape)
    for what, jaxpr in jaxprs.items():
        matmul, small, other = _cost(jaxpr)
        total = matmul + small + other
        assert small / total < MAX_SMALL_DOT_SHARE, f"{what}: {small / total:.1%} in small dots"
        assert matmul / total >= MIN_MATMUL_SHARE, f"{what}: {matmul / total:.1%} in matmuls"


@pytest.mark.parametrize("shape", BENCH_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_chunk_stores_nothing_much_larger_than_the_inputs(shape):
    limit, jaxprs = _gsa_jaxprs(shape)
    for what, jaxpr in jaxprs.items():
        for eqn, calls in _equations(jaxpr):
            if calls:  # checked inside
                continue
            name = eqn.primitive.name
            big_out = [v.aval.shape for v in eqn.outvars if _nbytes(v.aval) > limit]
            assert name in FUSIBLE or not big_out, f"{what}: {name} makes {big_out}"
            if name == "dot_general":
                sizes = [_nbytes(v.aval) for v in (*eqn.invars, *eqn.outvars)]
                assert max(sizes) <= limit, f"{what}: a matmul on {max(sizes)} bytes"


@pytest.mark.parametrize("gate_axis", ["key", "value"])
def test_chunk_backward_keeps_only_the_inputs(gate_axis):
    """The vjp's saved values (the leaves of its closure) are q, k, v, g as given, in bf16,
    and the initial state (zeros, float32): no float32 copy, no chunk state, no intermediate."""
    B, T, H, K, V = 2, 1024, 4, 64, 32
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # noqa: E731
    args = (sds(B, T, H, K), sds(B, T, H, K), sds(B, T, H, V),
            sds(B, T, H, K if gate_axis == "key" else V))

    def f(*a):
        return gated_linear_attention(*a, gate_axis=gate_axis, impl="chunk")[0]

    saved = jax.tree_util.tree_leaves(jax.eval_shape(lambda *a: jax.vjp(f, *a)[1], *args))
    got = sorted((tuple(x.shape), str(x.dtype)) for x in saved)
    want = sorted([(tuple(a.shape), "bfloat16") for a in args] + [((B, H, K, V), "float32")])
    assert got == want


def test_chunk_forward_matches_float64_at_long_chunks(x64):
    """C = 128: diagonal blocks and four levels (h = 8 .. 64), the state scan over blocks of
    8 chunks and a recursion (T = 2100 is 17 chunks, padded), against the float64 recurrent
    form, on both gate axes."""
    rng = np.random.default_rng(60)
    B, T, H, K, V = 1, 2100, 2, 4, 3
    for gate_axis in ("key", "value"):
        q, k = rng.standard_normal((2, B, T, H, K))
        v = rng.standard_normal((B, T, H, V))
        g = -0.05 * rng.random((B, T, H, K if gate_axis == "key" else V))
        s0 = rng.standard_normal((B, H, K, V))
        out = {impl: jax.jit(lambda *a, impl=impl: gated_linear_attention(
            *a[:4], gate_axis=gate_axis, initial_state=a[4], return_final_state=True, impl=impl,
            chunk_size=128))(q, k, v, g, s0) for impl in ("chunk", "recurrent")}
        for a, b in zip(out["chunk"], out["recurrent"]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-9)

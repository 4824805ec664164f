"""Forward Pallas TPU (Mosaic) kernel of chunked gated linear attention.

One kernel walks the chunks of each (batch, query head) in order (grid and layouts in
tpu_plan.py), carrying the float32 state in VMEM scratch. Per chunk it can write the output,
the state entering the chunk (kept for the backward pass) or both; the state-only form is the
backward's recomputation of the chunk states (`recompute_states`). The algebra is in
tpu_chunk_math.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import common, tpu_chunk_math
from pallas_kernels.tpu_plan import Plan

f32 = jnp.float32


def chunk_setup(plan: Plan, g_ref, rel_refs):
    """(masks, gates) of the current chunk."""
    rel = [r[...] for r in rel_refs] if rel_refs else [None, None]
    masks = tpu_chunk_math.chunk_masks(plan.C, *rel)
    return masks, tpu_chunk_math.gates(g_ref[...], masks)


def _forward_kernel(*refs, plan: Plan, scale, has_runs, with_output, keep_states, dot):
    refs = list(refs)
    q_ref = refs.pop(0) if with_output else None
    k_ref, v_ref, g_ref = refs[:3]
    rel_refs = refs[3:5] if has_runs else ()
    s0_ref, *refs = refs[5 if has_runs else 3:]
    o_ref = refs.pop(0) if with_output else None
    states_ref = refs.pop(0) if keep_states else None
    sT_ref, W_ref = refs
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        W_ref[...] = s0_ref[...].astype(f32)

    W = W_ref[...]
    if keep_states:
        states_ref[...] = W.astype(states_ref.dtype)
    masks, gt = chunk_setup(plan, g_ref, rel_refs)
    k, v = k_ref[...], v_ref[...]
    if with_output:
        o = tpu_chunk_math.output(q_ref[...], k, v, W, gt, masks, key_gated=plan.key_gated,
                                  scale=scale, dot=dot, sub=plan.sub)
        o_ref[...] = o.astype(o_ref.dtype)
    W = tpu_chunk_math.state_update(k, v, W, gt, key_gated=plan.key_gated, dot=dot)
    W_ref[...] = W

    @pl.when(n == plan.N - 1)
    def _():
        sT_ref[...] = W


def interpret_params(interpret):
    """pallas_call's `interpret` from ours: False (compiled by Mosaic), True (TPU interpret
    mode: TPU memory and grid semantics simulated on the CPU, uninitialised buffers filled with
    NaN so that a read before a write shows) or a `pltpu.InterpretParams` of one's own (e.g.
    two simulated cores taking the parallel grid axes in a random order)."""
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    return pltpu.InterpretParams() if interpret else False


def forward(plan: Plan, q, k, v, g, s0, rel, *, scale, with_output=True, keep_states=False,
            out_dtype=None, interpret=False):
    """Run the forward walk.

    Args (kernel layouts of tpu_plan.Plan): q, k, v, g chunked sequence operands (q unused
    when not with_output); s0 [B, H, W0, W1] float32 initial state; rel None or (rel_col
    [B, Tp, 1], rel_row [B, N, 1, C]) float32 relative segment runs.
    Returns (o or None, chunk states [B, H, N·W0, W1] in k's dtype or None, final state
    [B, H, W0, W1] float32).
    """
    W0, W1 = plan.state_shape
    args, in_specs = [], []
    if with_output:
        args.append(q)
        in_specs.append(plan.seq(plan.K, kv=False))
    args += [k, v, g]
    in_specs += [plan.seq(plan.K, kv=True), plan.seq(plan.V, kv=True),
                 plan.seq(plan.Dg, kv=True)]
    if rel is not None:
        args += list(rel)
        in_specs += [plan.rel_col(), plan.rel_row()]
    args.append(s0)
    in_specs.append(plan.state())
    out_shape, out_specs = [], []
    if with_output:
        out_shape.append(jax.ShapeDtypeStruct(plan.out_shape(plan.V), out_dtype or q.dtype))
        out_specs.append(plan.seq(plan.V, kv=False))
    if keep_states:
        out_shape.append(jax.ShapeDtypeStruct((plan.B, plan.H, plan.N * W0, W1), k.dtype))
        out_specs.append(plan.states())
    out_shape.append(jax.ShapeDtypeStruct((plan.B, plan.H, W0, W1), f32))
    out_specs.append(plan.state())
    kernel = functools.partial(
        _forward_kernel, plan=plan, scale=float(scale), has_runs=rel is not None,
        with_output=with_output, keep_states=keep_states,
        dot=common.Dot(k.dtype, f32_precision=tpu_chunk_math.HIGHEST))
    outs = list(pl.pallas_call(
        kernel, out_shape=out_shape, grid=plan.grid, in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((W0, W1), f32)], compiler_params=plan.compiler_params(),
        cost_estimate=plan.cost_estimate("forward" if with_output else "states",
                                         keep_states=keep_states, segments=rel is not None),
        interpret=interpret_params(interpret),
        name="gla_tpu_forward" if with_output else "gla_tpu_states",
    )(*args))
    o = outs.pop(0) if with_output else None
    states = outs.pop(0) if keep_states else None
    return o, states, outs[0]

"""Backward Pallas TPU (Mosaic) kernel of chunked gated linear attention.

One kernel walks the chunks of each (batch, query head) in reverse, carrying dW, the float32
gradient of the state, in VMEM scratch (set from the final state's cotangent at the last
chunk). Per chunk it reads the state entering the chunk (kept by the forward pass or
recomputed), writes dq, dk, dv, dg of the chunk and moves dW to the chunk's start; at the first
chunk dW is the gradient of the initial state. Algebra: tpu_chunk_math.py (gradient formulas
derived in gla_bwd.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import common, tpu_chunk_math
from pallas_kernels.tpu_gla_fwd import chunk_setup, interpret_params
from pallas_kernels.tpu_plan import Plan

f32 = jnp.float32


def _backward_kernel(*refs, plan: Plan, scale, has_runs, dot):
    q_ref, k_ref, v_ref, g_ref, *refs = refs
    rel_refs = refs[:2] if has_runs else ()
    (states_ref, do_ref, dsT_ref, dq_ref, dk_ref, dv_ref, dg_ref, ds0_ref,
     dW_ref) = refs[2 if has_runs else 0:]
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        dW_ref[...] = dsT_ref[...].astype(f32)

    dW = dW_ref[...]
    masks, gt = chunk_setup(plan, g_ref, rel_refs)
    q, do = q_ref[...], do_ref[...]
    kw = dict(key_gated=plan.key_gated, scale=scale, dot=dot)
    dq, dk, dv, db = tpu_chunk_math.grads(q, k_ref[...], v_ref[...], do,
                                          states_ref[...].astype(f32), dW, gt, masks,
                                          sub=plan.sub, **kw)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    dg_ref[...] = tpu_chunk_math.reverse_cumsum(db).astype(dg_ref.dtype)
    dW = tpu_chunk_math.dstate_update(q, do, dW, gt, masks, **kw)
    dW_ref[...] = dW

    @pl.when(n == plan.N - 1)
    def _():
        ds0_ref[...] = dW


def backward(plan: Plan, q, k, v, g, rel, states, do, dsT, *, scale, interpret=False):
    """Gradients of one GLA call.

    Args (kernel layouts of tpu_plan.Plan): q, k, v, g, rel as `tpu_gla_fwd.forward`; states
    [B, H, N·W0, W1] the state entering each chunk; do the output's cotangent (layout of o);
    dsT [B, H, W0, W1] the final state's.
    Returns per query head (the caller sums grouped heads), in kernel layouts: dq, dk, dv, dg
    (float32 where grouped heads will be summed, else the inputs' dtypes) and ds0 [B, H, W0,
    W1] float32.
    """
    W0, W1 = plan.state_shape
    rev = dict(reverse=True)
    args = [q, k, v, g]
    in_specs = [plan.seq(plan.K, kv=False, **rev), plan.seq(plan.K, kv=True, **rev),
                plan.seq(plan.V, kv=True, **rev), plan.seq(plan.Dg, kv=True, **rev)]
    if rel is not None:
        args += list(rel)
        in_specs += [plan.rel_col(**rev), plan.rel_row(**rev)]
    args += [states, do, dsT]
    in_specs += [plan.states(**rev), plan.seq(plan.V, kv=False, **rev), plan.state()]

    def grad(D, dtype, summed_later):
        shape = plan.out_shape(D)
        return (jax.ShapeDtypeStruct(shape, f32 if summed_later else dtype),
                plan.seq(D, kv=False, **rev))

    grouped = plan.group > 1
    outs = [grad(plan.K, q.dtype, False), grad(plan.K, k.dtype, grouped),
            grad(plan.V, v.dtype, grouped), grad(plan.Dg, g.dtype, grouped),
            (jax.ShapeDtypeStruct((plan.B, plan.H, W0, W1), f32), plan.state())]
    kernel = functools.partial(_backward_kernel, plan=plan, scale=float(scale),
                               has_runs=rel is not None,
                               dot=common.Dot(q.dtype, f32_precision=tpu_chunk_math.HIGHEST))
    return pl.pallas_call(
        kernel, out_shape=[s for s, _ in outs], grid=plan.grid, in_specs=in_specs,
        out_specs=[spec for _, spec in outs], scratch_shapes=[pltpu.VMEM((W0, W1), f32)],
        compiler_params=plan.compiler_params(), interpret=interpret_params(interpret),
        cost_estimate=plan.cost_estimate("backward", keep_states=True,
                                         segments=rel is not None),
        name="gla_tpu_backward",
    )(*args)

"""GSA's forward (no gradient) in ONE sequential walk: both GLA passes per chunk.

GSA is two GLA passes (gsa_jax/ops/gsa.py) that share the slot gate g [C, M] and the write
weights s: pass 1 (q, k, s) gated on its value axis (the slots), pass 2 (p, s, v) on its key
axis (the slots again). Per chunk, with Hk [K, M] and Hv [M, BV] the float32 states entering it
(algebra and gate paths in chunk_math.py):

    z   = output(q, k, s, Hk)           [C, M]   pass 1, scale · q·(keys), value-gated
    p   = act(z)                          [C, M]   softmax over the slots (or an ablation's)
    o   = output(p, s, v, Hv)           [C, BV]  pass 2, scale 1, key-gated
    Hk' = Hk diag(e^{b_C}) + kᵀ(s ⊙ e^{b_C − b}),  Hv' = diag(e^{b_C}) Hv + (s ⊙ e^{b_C − b})ᵀ v

Against the two GLA walks (gla_fwd.fused_fwd, once per pass) this keeps z and p on chip (the
float32 z does not go to memory and back, no XLA activation runs between the passes), reads s
and g once, computes the chunk's gate factors once and launches one kernel. p is rounded to q's
dtype before pass 2, as between the two GLA walks, so the outputs are the same to float32
rounding. Pass 1 needs every slot of z for the activation, so each program holds all M slots
(M ≤ `Tuning.block_v`); with V in several value blocks each block's program redoes pass 1.

Where the walk is short (≤ `Tuning.fused_max_chunks` chunks) one walk per (batch, head, value
block) does it all. With few such programs the time axis is split in big chunks as the GLA
forward does (two_level.py): both passes' big-chunk final states (the state kernels, final
only: neither pass's state walk depends on the other's outputs), their combines, then this walk
over every big chunk from its two true entering states.

Off by default (`Tuning.fused_gsa`) until timed on a GPU. Its cost is registers: one program
holds both float32 states ([K, M] and [M, BV]) and both passes' tiles; compiled on the CPU
(experiments/results/kernel_registers_cpufwd.md) it spills 1.6 KB per thread at K = V = 128,
M = 64 (0.9 KB with a value block of 64), where each GLA walk spills 48-80 bytes.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import chunk_math, common, two_level
from pallas_kernels import gla as pgla
from pallas_kernels.gla_fwd import states_fwd

f32 = jnp.float32


def _kernel(*refs, lay: common.Layout, has_runs, scale, activation, dot):
    q_ref, k_ref, v_ref, s_ref, g_ref, *refs = refs
    runs_ref = refs.pop(0) if has_runs else None
    hk0_ref, hv0_ref, o_ref, hkT_ref, hvT_ref = refs
    C, sub = lay.C, lay.sub
    causal = common.causal_mask(C)

    def body(n, carry):
        Hk, Hv, run_prev = carry
        rows = pl.ds(n * C, C)
        masks = common.chunk_masks(runs_ref, rows, run_prev, causal)
        gt = chunk_math.gates(g_ref[rows, :], masks)
        q, k, s, v = q_ref[rows, :], k_ref[rows, :], s_ref[rows, :], v_ref[rows, :]
        z = chunk_math.output(q, k, s, Hk, gt, masks, key_gated=False, scale=scale, dot=dot,
                              sub=sub)
        p = activation(z).astype(q.dtype)
        o = chunk_math.output(p, s, v, Hv, gt, masks, key_gated=True, scale=1.0, dot=dot,
                              sub=sub)
        o_ref[rows, :] = o.astype(o_ref.dtype)
        Hk = chunk_math.state_update(k, s, Hk, gt, key_gated=False, dot=dot)
        Hv = chunk_math.state_update(s, v, Hv, gt, key_gated=True, dot=dot)
        return Hk, Hv, masks.run_last

    init = (hk0_ref[...].astype(f32), hv0_ref[...].astype(f32), jnp.int32(0))
    Hk, Hv, _ = lax.fori_loop(0, lay.N, body, init)
    hkT_ref[...] = Hk
    hvT_ref[...] = Hv


def walk(q, k, v, s, g, hk0, hv0, runs, *, scale: float, activation: Callable, chunk_size: int,
         block_v: int, out_dtype, interpret: bool = False, num_warps: int = 8,
         num_stages: int = 2, sub_chunk: int = 0):
    """The one-walk kernel. Inputs padded to Tp = N·C: q [B, Tp, H, K], k [B, Tp, Hkv, K],
    v [B, Tp, Hkv, V], s and g [B, Tp, Hkv, M], hk0 [B, H, K, M] and hv0 [B, H, M, V] f32,
    runs [B, Tp] int32 or None; block_v divides V. Returns (o [B, Tp, H, V] in out_dtype,
    Hk [B, H, K, M] f32, Hv [B, H, M, V] f32)."""
    B, Tp, H, K = q.shape
    M, V = s.shape[-1], v.shape[-1]
    lay = common.Layout(B=B, Tp=Tp, H=H, Hkv=v.shape[2], K=K, V=V, C=chunk_size,
                        BV=min(block_v, V), key_gated=True, parallel=False, sub=sub_chunk)
    slots = lay.seq(M, kv_head=True, value_block=False)
    args = [q, k, v, s, g]
    in_specs = [lay.q(), lay.k(), lay.v(), slots, slots]
    if runs is not None:
        args.append(runs)
        in_specs.append(lay.runs())
    args += [hk0, hv0]
    in_specs += [pl.BlockSpec((None, None, K, M), lambda b, h, j: (b, h, 0, 0)),
                 pl.BlockSpec((None, None, M, lay.BV), lambda b, h, j: (b, h, 0, j))]
    # every value block's program computes the same Hk: each writes its own copy, the first kept
    out_shape = [jax.ShapeDtypeStruct((B, Tp, H, V), out_dtype),
                 jax.ShapeDtypeStruct((lay.NV, B, H, K, M), f32),
                 jax.ShapeDtypeStruct((B, H, M, V), f32)]
    out_specs = [lay.o(),
                 pl.BlockSpec((None, None, None, K, M), lambda b, h, j: (j, b, h, 0, 0)),
                 pl.BlockSpec((None, None, M, lay.BV), lambda b, h, j: (b, h, 0, j))]
    kernel = functools.partial(_kernel, lay=lay, has_runs=runs is not None, scale=float(scale),
                               activation=activation, dot=common.Dot(q.dtype, interpret))
    o, hk, hv = pl.pallas_call(
        kernel, out_shape=out_shape, grid=lay.grid, in_specs=in_specs, out_specs=out_specs,
        compiler_params=common.compiler_params(num_warps, num_stages),
        interpret=interpret, name="gsa_fused_fwd")(*args)
    return o, hk[0], hv


def _plan(B: int, H: int, N: int, V: int, tuning: pgla.Tuning):
    """"walk" (one walk over all N chunks), a two_level.SplitPlan (big chunks), or None where
    the GLA forward would not take its fused walk either (the two passes then run as they do
    without `fused_gsa`: a walk that long is slower than state pass + chunk-parallel output)."""
    t = tuning
    if not (t.fused_forward and t.fused_max_chunks > 0):
        return None
    programs = B * H * (V // t.block_v)
    sp = two_level.plan(programs, N, below=t.split_below_programs, target=t.split_programs,
                        min_chunks=t.split_min_chunks)
    if sp is not None and t.fused_split:
        if sp.L > t.fused_max_chunks:
            sp = two_level.SplitPlan(N=sp.N, L=t.fused_max_chunks,
                                     NB=-(-sp.N // t.fused_max_chunks))
        return sp
    return "walk" if N <= t.fused_max_chunks else None


def fused_applies(q_shape, v_shape, M: int, dtype, chunk_size: int) -> bool:
    """Whether `gsa_forward` runs for these shapes under the tuning in force: `fused_gsa` on,
    K within one launch, M within `Tuning.block_v` (pass 1 holds every slot), and a
    forward the GLA kernels would fuse too (`_plan`)."""
    B, T, H, K = q_shape
    V = v_shape[-1]
    tuning = pgla.resolved_tuning(dtype, K, V)
    widest = pgla.current_tuning().block_v   # the value block before it is fitted to V
    if not tuning.fused_gsa or K > pgla.MAX_KEY_DIM or M > widest or T == 0:
        return False
    return _plan(B, H, -(-T // chunk_size), V, tuning) is not None


def gsa_forward(q, k, v, s, g, hk0, hv0, runs: Optional[jax.Array], *, scale: float,
                chunk_size: int, activation: Callable, interpret: bool = False):
    """GSA's forward by the one-walk kernel (no gradient: see gsa_jax/ops/pallas.py).

    Args as gsa_jax.ops.pallas.gsa_pallas: q [B, T, H, K]; k, v, s, g [B, T, Hkv, .]; hk0
    [B, H, K, M] and hv0 [B, H, M, V] per query head; runs [B, T] int32 or None; activation:
    z [C, M] f32 -> p, traced inside the kernel. Call only where `fused_applies`.
    Returns (o [B, T, H, V] in q's dtype, Hk [B, H, K, M] f32, Hv [B, H, M, V] f32)."""
    B, T, H, K = q.shape
    M, V, C = s.shape[-1], v.shape[-1], chunk_size
    q, k, v, g, runs = common.pad_to_chunks(q, k, v, g, runs, C)
    s = jnp.pad(s, ((0, 0), (0, q.shape[1] - T), (0, 0), (0, 0)))  # zero: writes nothing
    t = pgla.resolved_tuning(q.dtype, K, V)
    sub = chunk_math.sub_chunk_for(t.sub_chunk, C)
    walk_fn = functools.partial(
        walk, scale=scale, activation=activation, chunk_size=C, block_v=t.block_v,
        out_dtype=q.dtype, interpret=interpret, num_warps=t.warps_fused, num_stages=t.stages,
        sub_chunk=sub)
    hk0, hv0 = hk0.astype(f32), hv0.astype(f32)
    plan = _plan(B, H, q.shape[1] // C, V, t)
    if plan == "walk":
        o, hk, hv = walk_fn(q, k, v, s, g, hk0, hv0, runs)
        return o[:, :T], hk, hv
    final = functools.partial(states_fwd, final_only=True, chunk_size=C, interpret=interpret,
                              num_warps=t.warps_seq, num_stages=t.stages)
    kw = dict(sp=plan, C=C)
    (q_r, k_r, s_r, g_r), row_runs, hk_in, hk = two_level.big_chunk_entering_states(
        functools.partial(final, key_gated=False, block_v=M), q, k, s, g, hk0, runs,
        key_gated=False, **kw)
    # pass 2's state kernel reads only the shape of its queries (p, not known yet)
    p_shape = jnp.zeros(q.shape[:3] + (M,), q.dtype)
    (_, _, v_r, _), _, hv_in, hv = two_level.big_chunk_entering_states(
        functools.partial(final, key_gated=True, block_v=t.block_v), p_shape, s, v, g, hv0,
        runs, key_gated=True, **kw)
    o, _, _ = walk_fn(q_r, k_r, v_r, s_r, g_r, hk_in, hv_in, row_runs)
    return two_level.from_rows(o, B, T), hk, hv

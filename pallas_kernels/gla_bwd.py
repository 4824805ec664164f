"""Backward Pallas (Triton) kernels of chunked gated linear attention.

`dstates_bwd` walks the chunks in reverse carrying dS, the float32 gradient of the state, and
stores the gradient of the state leaving every chunk; `grads_bwd` then computes each chunk's
dq, dk, dv, dg in parallel from the state entering it (stored by the forward pass or recomputed)
and that gradient.

Derivation (notation of chunk_math.py; from/into/survive are the segment masks).
Gate on the key axis, with q̂ = q e^{b−ρ}, k̂ = k e^{ρ−b}, q̄ = q e^{b}·from, k̄ = k e^{b_C−b}·into:
    dA  = scale · mask ⊙ (do vᵀ),   dv = Aᵀ do + k̄ dS
    dq̂ = dA k̂,  dk̂ = dAᵀ q̂,  dq̄ = scale · do Sᵀ,  dk̄ = v dSᵀ
    dq  = dq̂ e^{b−ρ} + dq̄ e^{b}·from,   dk = dk̂ e^{ρ−b} + dk̄ e^{b_C−b}·into
    db  = dq̂⊙q̂ − dk̂⊙k̂ + dq̄⊙q̄ − dk̄⊙k̄,  plus on the last row Σ_i dk̄⊙k̄ + e^{b_C} Σ_v S⊙dS
    dS_in = diag(e^{b_C}·survive) dS + scale · q̄ᵀ do
Gate on the value axis, with X = scale · (q S)·from, v̂ = v e^{ρ−b}, v̄ = v e^{b_C−b}·into:
    dX = do e^{b}·from,  dY = do e^{b−ρ},  dv̂ = Aᵀ dY,  dA = scale · mask ⊙ (dY v̂ᵀ),  dv̄ = k dS
    dq = dA k + scale · dX Sᵀ,  dk = dAᵀ q + v̄ dSᵀ,  dv = dv̂ e^{ρ−b} + dv̄ e^{b_C−b}·into
    db = do⊙o − dv̂⊙v̂ − dv̄⊙v̄,  plus on the last row Σ_i dv̄⊙v̄ + e^{b_C} Σ_k S⊙dS
    dS_in = dS diag(e^{b_C}·survive) + scale · qᵀ dX
The ρ terms cancel exactly (A does not depend on ρ) and are left out. dg is the reverse
cumulative sum of db inside the chunk, since b_t = Σ_{j≤t} g_j.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import chunk_math, common
from pallas_kernels.gla_fwd import (_call, _row_inputs, _with_runs, entering_state, layout,
                                    load_gates, walk_outputs, when_past_the_bound)

f32 = jnp.float32


def _gate_grad(db, cumulative: bool):
    """The gradient of what g holds: the log gates' (the reverse sum of db inside the chunk,
    since b_t = Σ_{j≤t} g_j), or with cumulative b's own, db."""
    return db if cumulative else chunk_math.reverse_cumsum(db)


def _dstates_kernel(*refs, lay: common.Layout, has_runs, scale, dot, store=True, big_chunks=1,
                    combine=False, decay=False, cumulative=False):
    q_ref, g_ref, *refs = refs
    runs_ref = refs.pop(0) if has_runs else None
    do_ref, dsT_ref, *refs = refs
    combine_refs = (refs.pop(0), refs.pop(0)) if combine else None
    dstates_ref = refs.pop(0) if store else None
    ds0_ref, *refs = refs
    decay_ref = refs.pop(0) if decay else None
    C, K = lay.C, lay.K
    causal = common.causal_mask(C)

    def body(i, carry):
        dS, *P = carry
        n = lay.N - 1 - i
        rows = pl.ds(n * C, C)
        masks = common.chunk_masks(runs_ref, rows, common.chunk_run_prev(runs_ref, n, C), causal)
        gt, _ = load_gates(g_ref, rows, masks, cumulative)
        if store:
            dstates_ref[pl.ds(n * K, K), :] = dS.astype(dstates_ref.dtype)
        dS = chunk_math.dstate_update(q_ref[rows, :], do_ref[rows, :], dS, gt, masks,
                                      key_gated=lay.key_gated, scale=scale, dot=dot)
        return (dS, *(p * gt.decay_last for p in P))   # the walk's decay, as states_fwd's

    dS = entering_state(dsT_ref, big_chunks, combine_refs, lay.key_gated, reverse=True)
    init = (dS,) + ((jnp.ones((lay.DG,), f32),) if decay else ())
    dS, *P = lax.fori_loop(0, lay.N, body, init)
    ds0_ref[...] = dS
    if decay:
        decay_ref[...] = P[0]


def _grads_kernel(*refs, lay: common.Layout, has_runs, scale, dot, key_loop: int,
                  strong_apart: bool, cumulative=False, identity=False):
    q_ref, k_ref, v_ref, g_ref, *refs = refs
    runs_ref = refs.pop(0) if has_runs else None
    state_ref, dstate_ref, do_ref, dq_ref, dk_ref, dv_ref, dg_ref = refs
    kw = dict(key_gated=lay.key_gated, scale=scale, dot=dot, sub=lay.sub, identity=identity)

    def chunk(n, j):
        rows = pl.ds(n * lay.C, lay.C)
        masks = common.chunk_masks(runs_ref, rows, common.chunk_run_prev(runs_ref, n, lay.C),
                                   common.causal_mask(lay.C))
        # the gates of the whole K, read once where they are needed (a key loop reads a
        # key-gated pass's gates per key block); strong_apart: the tile past the bound or not,
        # as the strong kernel decides it (its layout's tile: a key block of the grid, or the
        # whole K around a key loop)
        whole, past = (load_gates(g_ref, rows, masks, cumulative)
                       if (strong_apart or not key_loop or not lay.key_gated) else (None, None))
        apart = past if strong_apart else None
        if not key_loop:
            dq, dk, dv, db = chunk_math.grads(
                q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :],
                common.chunk_state(state_ref, lay, j).astype(f32),
                common.chunk_state(dstate_ref, lay, j).astype(f32), gt=whole, masks=masks,
                apart=apart, **kw)
            dq_ref[rows, :] = dq.astype(dq_ref.dtype)
            dk_ref[rows, :] = dk.astype(dk_ref.dtype)
            dv_ref[rows, :] = dv.astype(dv_ref.dtype)
            dg_ref[rows, :] = _gate_grad(db, cumulative).astype(dg_ref.dtype)
            return
        # key blocks of `key_loop` channels one after another (grads_bwd's docstring): dq, dk
        # (and the key gate's db) stored per block, dv (and the value gate's db) summed over
        # blocks
        v, do = v_ref[rows, :], do_ref[rows, :]

        def key_block(kb, acc):
            cols = pl.ds(kb * key_loop, key_loop)
            gt = (load_gates(g_ref, rows, masks, cumulative, cols)[0] if lay.key_gated
                  else whole)
            dq, dk, dv, db = chunk_math.grads(
                q_ref[rows, cols], k_ref[rows, cols], v, do,
                common.chunk_state(state_ref, lay, j, cols).astype(f32),
                common.chunk_state(dstate_ref, lay, j, cols).astype(f32),
                gt=gt, masks=masks, apart=apart, **kw)
            dq_ref[rows, cols] = dq.astype(dq_ref.dtype)
            dk_ref[rows, cols] = dk.astype(dk_ref.dtype)
            if lay.key_gated:
                dg_ref[rows, cols] = _gate_grad(db, cumulative).astype(dg_ref.dtype)
                return acc[0] + dv, acc[1]
            return acc[0] + dv, acc[1] + db

        zeros = jnp.zeros(v.shape, f32)
        dv, db = lax.fori_loop(0, lay.K // key_loop, key_block, (zeros, zeros))
        dv_ref[rows, :] = dv.astype(dv_ref.dtype)
        if not lay.key_gated:
            dg_ref[rows, :] = _gate_grad(db, cumulative).astype(dg_ref.dtype)

    common.for_each_chunk(lay, chunk)


def _parallel_tile(runs_ref, g_ref, lay: common.Layout, cumulative: bool):
    """(rows, masks, gates, whether the tile is past the bound) of this program's chunk."""
    n = pl.program_id(0)
    rows = pl.ds(n * lay.C, lay.C)
    masks = common.chunk_masks(runs_ref, rows, common.chunk_run_prev(runs_ref, n, lay.C),
                               common.causal_mask(lay.C))
    return (rows, masks, *load_gates(g_ref, rows, masks, cumulative))


def _grads_query_kernel(*refs, lay: common.Layout, has_runs, scale, dot, cumulative=False,
                        identity=False):
    """The query side of the gradients (Tuning.split_grads_bwd): dq, and db_q in float32 for
    the key/value side's kernel."""
    q_ref, k_ref, v_ref, g_ref, *refs = refs
    runs_ref = refs.pop(0) if has_runs else None
    state_ref, do_ref, dq_ref, dbq_ref = refs
    rows, masks, gt, apart = _parallel_tile(runs_ref, g_ref, lay, cumulative)
    dq, db_q = chunk_math.grads_query_side(
        q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :],
        state_ref[...].astype(f32), gt, masks, key_gated=lay.key_gated, scale=scale, dot=dot,
        apart=apart, identity=identity)
    dq_ref[rows, :] = dq.astype(dq_ref.dtype)
    dbq_ref[rows, :] = db_q


def _grads_key_value_kernel(*refs, lay: common.Layout, has_runs, scale, dot,
                            cumulative=False, identity=False):
    """The key/value side (Tuning.split_grads_bwd): dk, dv, and dg from db_q + db_kv."""
    q_ref, k_ref, v_ref, g_ref, *refs = refs
    runs_ref = refs.pop(0) if has_runs else None
    state_ref, dstate_ref, do_ref, dbq_ref, dk_ref, dv_ref, dg_ref = refs
    rows, masks, gt, apart = _parallel_tile(runs_ref, g_ref, lay, cumulative)
    dk, dv, db = chunk_math.grads_key_value_side(
        q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :],
        state_ref[...].astype(f32), dstate_ref[...].astype(f32), gt, masks,
        key_gated=lay.key_gated, scale=scale, dot=dot, apart=apart, identity=identity)
    dk_ref[rows, :] = dk.astype(dk_ref.dtype)
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)
    dg_ref[rows, :] = _gate_grad(db + dbq_ref[rows, :], cumulative).astype(dg_ref.dtype)


def _strong_intra_grads_kernel(*refs, lay: common.Layout, has_runs, scale, dot,
                               cumulative=False):
    """Adds the within-chunk gradient terms of each tile past the bound to dq, dk, dv, dg
    (aliased in place); the programs of the other tiles write nothing."""
    q_ref, k_ref, v_ref, g_ref, *refs = refs
    runs_ref = refs.pop(0) if has_runs else None
    do_ref, *refs = refs
    ins, outs = refs[:4], refs[4:]   # dq, dk, dv, dg in and out: the same buffers (aliased)

    def add(rows, masks, gt):
        dq, dk, dv, db = chunk_math.intra_grads_strong(
            q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :], gt, masks,
            key_gated=lay.key_gated, scale=scale, dot=dot, sub=lay.sub)
        for src, dst, term in zip(ins, outs, (dq, dk, dv, _gate_grad(db, cumulative))):
            dst[rows, :] = (src[rows, :].astype(f32) + term).astype(dst.dtype)

    when_past_the_bound(runs_ref, g_ref, lay, add, cumulative)


def dstates_bwd(q, v, g, runs, do, dsT, *, key_gated, scale, chunk_size, block_v,
                interpret=False, num_warps=4, num_stages=2, final_only=False, big_chunks=1,
                combine=None, decay=False, cumulative=False):
    """Gradients of the state leaving each chunk [B, H, N·K, V] (in q's dtype, like the
    forward's chunk states) and of the initial state [B, H, K, V] f32 (final_only: (None,
    the latter)). big_chunks, combine, decay: the rows of a split time axis, as in
    gla_fwd.states_fwd, walked from the end: dsT is the batch's, each row's walk starts from
    `entering_state(..., reverse=True)`, and the initial state's gradient is each row's.
    cumulative: g holds b, the log gates summed inside each chunk (gla_fwd.load_gates)."""
    lay = layout(q, v, key_gated=key_gated, chunk_size=chunk_size, block_v=block_v,
                 parallel=False)
    args, in_specs = _with_runs(lay, [q, g], [lay.q(), lay.g()], runs)
    args.append(do)
    in_specs.append(lay.o())
    _row_inputs(lay, args, in_specs, dsT, big_chunks, combine)
    out_shape, out_specs = walk_outputs(lay, q.dtype, final_only=final_only,
                                        big_chunks=big_chunks, decay=decay)
    kernel = functools.partial(_dstates_kernel, lay=lay, has_runs=runs is not None,
                               scale=float(scale), dot=common.Dot(q.dtype, interpret),
                               store=not final_only, big_chunks=big_chunks,
                               combine=combine is not None, decay=decay, cumulative=cumulative)
    out = _call(kernel, lay, args, in_specs, out_shape, out_specs,
                interpret=interpret, num_warps=num_warps, num_stages=num_stages,
                name="gla_final_dstate_bwd" if final_only else "gla_dstates_bwd")
    return (None, *out) if final_only else tuple(out)


def grads_bwd(q, k, v, g, runs, states, dstates, do, *, key_gated, scale, chunk_size, block_v,
              interpret=False, num_warps=4, num_stages=2, sub_chunk=0, block_k=0,
              key_loop=False, strong_apart=False, split=False, cumulative=False, chunks=1,
              identity=False):
    """Per-query-head gradients (the caller sums value blocks, key blocks and grouped heads):
    dq [NV, B, Tp, H, K], dk [NV, B, Tp, H, K], dv [NK, B, Tp, H, V] or (one key block)
    [B, Tp, H, V], dg [NV, B, Tp, H, K] (key gate) or like dv (value gate).
    Float32 where partial sums follow (NV > 1, NK > 1, grouped heads), else the inputs' dtypes.

    block_k (0: the whole K): each program takes one key block of q, k (and the key gate) and
    of the chunk's state and state gradient, fewer values live at once. GLA is a sum over key
    channels, so chunk_math.grads on a key block gives that block's columns of dq, dk and the
    key gate's gradient exactly, and each block's share of dv and of the value gate's
    gradient (every term of those is linear in a sum over key channels). With key_loop the
    key blocks run one after another in each program instead of as programs of their own:
    the value-side sums stay in registers (no partial sums through memory), one key block's
    tiles live at a time.

    strong_apart: the kernel takes the fast within-chunk path only, and a second kernel adds
    the terms of the tiles past the chunk bound in place (Tuning.strong_gates_apart).

    split (Tuning.split_grads_bwd): two kernels on the same grid instead of one, the query
    side (dq, and db_q through memory in float32) then the key/value side (dk, dv, dg); each
    holds fewer values than the whole. Fast path only in both: the strong kernel runs
    (strong_apart implied). Not with a key loop.

    cumulative: g holds b, the log gates summed inside each chunk (gla_fwd.load_gates), and dg
    is b's gradient (no reverse sum inside the kernels).

    chunks: chunks per program of the gradient kernel (Tuning.chunks_per_program_bwd;
    gla_fwd.layout): each program walks its chunks one after another, so the next chunk's
    loads can overlap the current one's work. Not with the split (its kernels take one).

    identity (Tuning.key_gate_grad_identity): a key-gated pass computes the gate's gradient
    from the finished dq and dk (chunk_math.key_gate_grad); chunk_math reads it in its
    key-gated branches only, so a value-gated pass ignores it."""
    K = q.shape[-1]
    loop = block_k if key_loop and 0 < block_k < K else 0
    if split and loop:
        raise ValueError("Tuning.split_grads_bwd does not combine with a key loop "
                         "(key_loop_bwd): take key blocks as programs or the whole K")
    strong_apart = strong_apart or split
    lay = layout(q, v, key_gated=key_gated, chunk_size=chunk_size, block_v=block_v,
                 parallel=True, sub_chunk=sub_chunk, block_k=0 if key_loop else block_k,
                 chunks=1 if split else chunks)
    args, in_specs = _with_runs(lay, [q, k, v, g], [lay.q(), lay.k(), lay.v(), lay.g()], runs)
    args += [states, dstates, do]
    in_specs += [lay.states(), lay.states(), lay.o()]
    def out(shape, dtype, summed_later):
        return jax.ShapeDtypeStruct(shape, f32 if summed_later else dtype)

    per_block = (lay.NV, lay.B, lay.Tp, lay.H, lay.K)
    grouped = lay.group > 1
    if lay.NK > 1:   # the value-side gradients are partial sums over key blocks
        per_head, per_head_spec = (lay.NK, lay.B, lay.Tp, lay.H, lay.V), lay.per_key_block()
    else:
        per_head, per_head_spec = (lay.B, lay.Tp, lay.H, lay.V), lay.o()
    value_side_f32 = grouped or lay.NK > 1
    key_spec = lay.per_value_block(lay.KB, key_block=True)
    out_shape = [out(per_block, q.dtype, lay.NV > 1),
                 out(per_block, k.dtype, lay.NV > 1 or grouped),
                 out(per_head, v.dtype, value_side_f32),
                 (out(per_block, g.dtype, lay.NV > 1 or grouped) if key_gated
                  else out(per_head, g.dtype, value_side_f32))]
    out_specs = [key_spec, key_spec, per_head_spec, key_spec if key_gated else per_head_spec]
    launch = dict(interpret=interpret, num_warps=num_warps, num_stages=num_stages)
    if split:
        common_kw = dict(lay=lay, has_runs=runs is not None, scale=float(scale),
                         dot=common.Dot(q.dtype, interpret), cumulative=cumulative,
                         identity=identity)
        dbq_shape = jax.ShapeDtypeStruct(out_shape[3].shape, f32)
        # the query side reads the states (not their gradients)
        dq, dbq = _call(functools.partial(_grads_query_kernel, **common_kw), lay,
                        args[:-2] + [do], in_specs[:-2] + [lay.o()], [out_shape[0], dbq_shape],
                        [out_specs[0], out_specs[3]], name="gla_grads_query_bwd", **launch)
        dk, dv, dg = _call(functools.partial(_grads_key_value_kernel, **common_kw), lay,
                           args + [dbq], in_specs + [out_specs[3]], out_shape[1:],
                           out_specs[1:], name="gla_grads_key_value_bwd", **launch)
        grads = [dq, dk, dv, dg]
    else:
        kernel = functools.partial(_grads_kernel, lay=lay, has_runs=runs is not None,
                                   scale=float(scale), dot=common.Dot(q.dtype, interpret),
                                   key_loop=loop, strong_apart=strong_apart,
                                   cumulative=cumulative, identity=identity)
        grads = _call(kernel, lay, args, in_specs, out_shape, out_specs, name="gla_grads_bwd",
                      **launch)
    if not strong_apart:
        return grads
    # the same programs (chunk, head, value block, key block; one chunk each); the four
    # gradients in place
    lay = dataclasses.replace(lay, P=1)
    args, in_specs = args[:-3] + [do, *grads], in_specs[:-3] + [lay.o(), *out_specs]
    kernel = functools.partial(_strong_intra_grads_kernel, lay=lay, has_runs=runs is not None,
                               scale=float(scale), dot=common.Dot(q.dtype, interpret),
                               cumulative=cumulative)
    first = len(args) - 4
    return _call(kernel, lay, args, in_specs, out_shape, out_specs, interpret=interpret,
                 num_warps=num_warps, num_stages=num_stages, name="gla_strong_intra_bwd",
                 aliases={first + i: i for i in range(4)})

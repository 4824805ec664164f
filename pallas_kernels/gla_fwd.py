"""Forward Pallas (Triton) kernels of chunked gated linear attention.

Two ways to the output (the algebra is in chunk_math.py):
- split (default): `states_fwd` walks the chunks of each (batch, head, value block) carrying the
  float32 state and stores the state entering every chunk; `output_fwd` then computes each
  chunk's output in parallel, one program per chunk. The sequential kernel does one matmul per
  chunk; everything else runs with T/C times more programs.
- fused: `fused_fwd` computes outputs inside the sequential walk; no states are written, but only
  B·H·V/BV programs run, each with all the per-chunk work on its critical path.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import chunk_math, common

f32 = jnp.float32


def load_gates(g_ref, rows, masks, cumulative: bool, cols=slice(None)):
    """(Gates, whether the tile is past the chunk bound) of the chunk at rows (and columns
    cols: a key block). g_ref holds the log gates, or (cumulative, Tuning.cumulative_gates)
    b, their cumulative sum inside each chunk (chunk_math.chunk_cumsum): then b's last row is
    loaded as a [1, D] tile of its own and no scan or row sum runs here. The bound's test is
    exact in either form (the integer sum of is_extreme_tile, or the b_last every kernel
    loads alike), so kernels that share a tile's work classify it the same."""
    if not cumulative:
        g = g_ref[rows, cols]
        return chunk_math.gates(g, masks), chunk_math.is_extreme_tile(g)
    last = g_ref[pl.ds(rows.start + rows.size - 1, 1), cols]
    gt = chunk_math.cumulative_gates(g_ref[rows, cols], jnp.sum(last, axis=0), masks)
    return gt, chunk_math.is_extreme(gt)


def entering_state(s0_ref, big_chunks: int, combine_refs, key_gated: bool,
                   reverse: bool = False):
    """The float32 state a sequential program starts from. One row per batch (big_chunks 1):
    s0. Rows of a split time axis (row r = b·NB + j, big chunk j of batch b; s0_ref: batch
    b's initial state): s0 for j = 0, else 0 (a local walk), or with combine_refs = (F, D),
    F [NB, K, BV] the state leaving each big chunk of the batch walked from its own start
    (big chunk 0 from s0) and D [NB, DG] each big chunk's decay, the true entering state
        E_0 = s0,   E_j = D_{j-1} ⊙ E_{j-1} + F_{j-1}
    folded here over the big chunks before j (two_level.py's combine, in the kernel).
    reverse (the backward's walk from the end; s0_ref: the final state's gradient, F: the
    gradient of the state entering each big chunk from its own end): the same from the last
    big chunk down, E_{NB-1} = s0, E_j = D_{j+1} ⊙ E_{j+1} + F_{j+1}."""
    s0 = s0_ref[...].astype(f32)
    if big_chunks == 1:
        return s0
    j = pl.program_id(0) % big_chunks
    first = jnp.where(j == (big_chunks - 1 if reverse else 0), s0, 0.0)
    if combine_refs is None:
        return first
    F_ref, D_ref = combine_refs

    def fold(step, E):
        i = big_chunks - 1 - step if reverse else step
        d = D_ref[i]
        return (d[:, None] * E if key_gated else E * d[None, :]) + F_ref[i]

    return lax.fori_loop(0, big_chunks - 1 - j if reverse else j, fold, first)


def _states_kernel(*refs, lay: common.Layout, has_runs, store_states, dot, big_chunks=1,
                   combine=False, decay=False, cumulative=False):
    k_ref, v_ref, g_ref, *refs = refs
    runs_ref = refs.pop(0) if has_runs else None
    s0_ref, *refs = refs
    combine_refs = (refs.pop(0), refs.pop(0)) if combine else None
    states_ref = refs.pop(0) if store_states else None
    sT_ref, *refs = refs
    decay_ref = refs.pop(0) if decay else None
    C, K = lay.C, lay.K
    causal = common.causal_mask(C)

    def body(n, carry):
        S, run_prev, *P = carry
        rows = pl.ds(n * C, C)
        masks = common.chunk_masks(runs_ref, rows, run_prev, causal)
        gt, _ = load_gates(g_ref, rows, masks, cumulative)
        if store_states:
            states_ref[pl.ds(n * K, K), :] = S.astype(states_ref.dtype)
        S = chunk_math.state_update(k_ref[rows, :], v_ref[rows, :], S, gt,
                                    key_gated=lay.key_gated, dot=dot)
        # the walk's decay: the product of its chunks' e^{b_C}·survive
        return (S, masks.run_last, *(p * gt.decay_last for p in P))

    S0 = entering_state(s0_ref, big_chunks, combine_refs, lay.key_gated)
    init = (S0, jnp.int32(0)) + ((jnp.ones((lay.DG,), f32),) if decay else ())
    S, _, *P = lax.fori_loop(0, lay.N, body, init)
    sT_ref[...] = S
    if decay:
        decay_ref[...] = P[0]


def _program_chunk(runs_ref, lay: common.Layout, n):
    """(rows, masks) of chunk n, the one a program of the parallel grid computes."""
    rows = pl.ds(n * lay.C, lay.C)
    return rows, common.chunk_masks(runs_ref, rows, common.chunk_run_prev(runs_ref, n, lay.C),
                                    common.causal_mask(lay.C))


def _output_kernel(*refs, lay: common.Layout, has_runs, scale, dot, strong_apart,
                   cumulative=False):
    q_ref, k_ref, v_ref, g_ref, *refs = refs
    runs_ref = refs.pop(0) if has_runs else None
    state_ref, o_ref = refs

    def chunk(n, j):
        rows, masks = _program_chunk(runs_ref, lay, n)
        gt, past = load_gates(g_ref, rows, masks, cumulative)
        o = chunk_math.output(q_ref[rows, :], k_ref[rows, :], v_ref[rows, :],
                              common.chunk_state(state_ref, lay, j).astype(f32), gt, masks,
                              key_gated=lay.key_gated, scale=scale, dot=dot, sub=lay.sub,
                              apart=past if strong_apart else None)
        o_ref[rows, :] = o.astype(o_ref.dtype)

    common.for_each_chunk(lay, chunk)


def when_past_the_bound(runs_ref, g_ref, lay: common.Layout, body, cumulative=False):
    """body(rows, masks, gates) in a program of the parallel grid whose chunk's tile is past
    the bound; the other programs only read their gates and sum them (cumulative: read the
    last row of b)."""
    n = pl.program_id(0)   # outside the branch: interpret mode cannot read it inside one
    rows = pl.ds(n * lay.C, lay.C)
    if cumulative:
        past = chunk_math.is_extreme_last(g_ref[pl.ds(n * lay.C + lay.C - 1, 1), :])
        gates_of = lambda masks: load_gates(g_ref, rows, masks, True)[0]   # noqa: E731
    else:
        g = g_ref[rows, :]
        past = chunk_math.is_extreme_tile(g)
        gates_of = functools.partial(chunk_math.gates, g)

    @pl.when(past)
    def _():
        _, masks = _program_chunk(runs_ref, lay, n)
        body(rows, masks, gates_of(masks))


def _strong_intra_kernel(*refs, lay: common.Layout, has_runs, scale, dot, cumulative=False):
    """Adds the within-chunk term of each tile past the bound to o (aliased in place); the
    programs of the other tiles write nothing."""
    q_ref, k_ref, v_ref, g_ref, *refs = refs
    runs_ref = refs.pop(0) if has_runs else None
    o_in_ref, o_ref = refs

    def add(rows, masks, gt):
        intra = chunk_math.intra_output_strong(
            q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], gt, masks,
            key_gated=lay.key_gated, scale=scale, dot=dot, sub=lay.sub)
        o_ref[rows, :] = (o_in_ref[rows, :].astype(f32) + intra).astype(o_ref.dtype)

    when_past_the_bound(runs_ref, g_ref, lay, add, cumulative)


def _fused_kernel(*refs, lay: common.Layout, has_runs, scale, dot, strong_apart,
                  big_chunks=1, combine=False, cumulative=False):
    q_ref, k_ref, v_ref, g_ref, *refs = refs
    runs_ref = refs.pop(0) if has_runs else None
    s0_ref, *refs = refs
    combine_refs = (refs.pop(0), refs.pop(0)) if combine else None
    o_ref, sT_ref = refs
    C = lay.C
    causal = common.causal_mask(C)

    def body(n, carry):
        S, run_prev = carry
        rows = pl.ds(n * C, C)
        masks = common.chunk_masks(runs_ref, rows, run_prev, causal)
        gt, past = load_gates(g_ref, rows, masks, cumulative)
        k, v = k_ref[rows, :], v_ref[rows, :]
        o = chunk_math.output(q_ref[rows, :], k, v, S, gt, masks, key_gated=lay.key_gated,
                              scale=scale, dot=dot, sub=lay.sub,
                              apart=past if strong_apart else None)
        o_ref[rows, :] = o.astype(o_ref.dtype)
        S = chunk_math.state_update(k, v, S, gt, key_gated=lay.key_gated, dot=dot)
        return S, masks.run_last

    S0 = entering_state(s0_ref, big_chunks, combine_refs, lay.key_gated)
    S, _ = lax.fori_loop(0, lay.N, body, (S0, jnp.int32(0)))
    sT_ref[...] = S


def layout(q, v, *, key_gated, chunk_size, block_v, parallel, sub_chunk=0,
           block_k=0, chunks=1) -> common.Layout:
    """The launch's Layout; chunks: the chunks per program wanted on the parallel grid (the
    largest divisor of the chunk count up to it is taken, `common.chunks_per_program`)."""
    B, Tp, H, K = q.shape
    lay = common.Layout(B=B, Tp=Tp, H=H, Hkv=v.shape[2], K=K, V=v.shape[3], C=chunk_size,
                        BV=min(block_v, v.shape[3]), key_gated=key_gated, parallel=parallel,
                        sub=sub_chunk, BK=block_k if 0 < block_k < K else 0)
    if parallel and chunks > 1:
        lay = dataclasses.replace(lay, P=common.chunks_per_program(chunks, lay))
    return lay


def _with_runs(lay, args, in_specs, runs):
    """The inputs and their specs, with the segment runs [B, Tp] appended when there are any."""
    if runs is not None:
        args.append(runs)
        in_specs.append(lay.runs())
    return args, in_specs


def _call(kernel, lay, args, in_specs, out_shape, out_specs, *, interpret, num_warps,
          num_stages, name, aliases=None):
    """One launch on the layout's grid (aliases: input index -> output index, in place)."""
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=lay.grid, in_specs=in_specs, out_specs=out_specs,
        input_output_aliases=aliases or {},
        compiler_params=common.compiler_params(num_warps, num_stages),
        interpret=interpret, name=name,
    )(*args)


def _row_inputs(lay: common.Layout, args, in_specs, s0, big_chunks: int, combine):
    """Appends the entering state's inputs of a sequential kernel: s0 [B, H, K, V] (per row,
    or per batch for the rows of a split time axis), and (combine) the big chunks' leaving
    states [B, NB, H, K, V] and decays [B, NB, H, NV, DG] (see `entering_state`)."""
    args.append(s0)
    in_specs.append(lay.state() if big_chunks == 1 else lay.batch_state(big_chunks))
    if combine is not None:
        args += list(combine)
        in_specs += [lay.big_chunk_states(big_chunks), lay.big_chunk_decays(big_chunks)]


def walk_outputs(lay: common.Layout, dtype, *, final_only, big_chunks, decay):
    """(out_shape, out_specs) of a sequential state walk (states_fwd, gla_bwd.dstates_bwd):
    the per-chunk states [B, H, N·K, V] in dtype (not with final_only; in time order for the
    rows of a split time axis: [B, H, NB·L·K, V]), the walk's last state [rows, H, K, V] f32,
    and (decay) the walk's decay [rows, H, NV, DG] f32."""
    out_shape = [jax.ShapeDtypeStruct((lay.B // big_chunks, lay.H, big_chunks * lay.N * lay.K,
                                       lay.V), dtype),
                 jax.ShapeDtypeStruct((lay.B, lay.H, lay.K, lay.V), f32)]
    out_specs = [lay.states() if big_chunks == 1 else lay.batch_chunk_states(big_chunks),
                 lay.state()]
    if final_only:
        out_shape, out_specs = out_shape[1:], out_specs[1:]
    if decay:
        out_shape.append(jax.ShapeDtypeStruct((lay.B, lay.H, lay.NV, lay.DG), f32))
        out_specs.append(lay.decay())
    return out_shape, out_specs


def states_fwd(q, k, v, g, s0, runs, *, key_gated, chunk_size, block_v, interpret=False,
               num_warps=4, num_stages=2, final_only=False, big_chunks=1, combine=None,
               decay=False, cumulative=False):
    """States entering each chunk [B, H, N·K, V] and the final state [B, H, K, V] f32
    (final_only: (None, the final state); no chunk state is written).

    The chunk states are stored in the inputs' dtype: the kernels that read them feed them to
    matmuls in that dtype anyway, and bf16 halves their memory traffic. Inputs padded to
    Tp = N·C: q [B, Tp, H, K] (only its shape is used), k [B, Tp, Hkv, K], v [B, Tp, Hkv, V],
    g [B, Tp, Hkv, K or V], s0 [B, H, K, V] f32, runs [B, Tp] int32 or None.

    The rows of a split time axis (big_chunks = NB > 1; the inputs are [B·NB, L·C, ., .] rows,
    two_level.py): s0 is the batch's [B, H, K, V], each row walks from the state
    `entering_state` gives it (combine: (F, D) of the big chunks, the true entering state; else
    s0 for a batch's first row and 0 for the others), and the chunk states are written in
    time order, [B, H, NB·L·K, V]; the final state is each row's, [B·NB, H, K, V].
    decay: also each walk's decay, the product of its chunks' e^{b_C}·survive,
    [B·NB, H, NV, DG] f32 (DG: K with a key gate, the value block with a value gate),
    appended to the outputs.
    cumulative: g holds b, the log gates' cumulative sum inside each chunk (`load_gates`).
    """
    lay = layout(q, v, key_gated=key_gated, chunk_size=chunk_size, block_v=block_v,
                 parallel=False)
    args, in_specs = _with_runs(lay, [k, v, g], [lay.k(), lay.v(), lay.g()], runs)
    _row_inputs(lay, args, in_specs, s0, big_chunks, combine)
    out_shape, out_specs = walk_outputs(lay, k.dtype, final_only=final_only,
                                        big_chunks=big_chunks, decay=decay)
    kernel = functools.partial(_states_kernel, lay=lay, has_runs=runs is not None,
                               store_states=not final_only, dot=common.Dot(k.dtype, interpret),
                               big_chunks=big_chunks, combine=combine is not None, decay=decay,
                               cumulative=cumulative)
    out = _call(kernel, lay, args, in_specs, out_shape, out_specs, interpret=interpret,
                num_warps=num_warps, num_stages=num_stages,
                name="gla_final_state_fwd" if final_only else "gla_states_fwd")
    return (None, *out) if final_only else tuple(out)


def output_fwd(q, k, v, g, states, runs, *, key_gated, scale, chunk_size, block_v, out_dtype,
               interpret=False, num_warps=4, num_stages=2, sub_chunk=0, strong_apart=False,
               cumulative=False, chunks=1):
    """o [B, Tp, H, V] from the inputs and the states entering each chunk, chunks in parallel.
    strong_apart: tiles past the chunk bound get their within-chunk term from `strong_intra`
    (Tuning.strong_gates_apart). cumulative: g holds b (`load_gates`). chunks: chunks per
    program (Tuning.chunks_per_program_fwd; `layout`)."""
    lay = layout(q, v, key_gated=key_gated, chunk_size=chunk_size, block_v=block_v,
                 parallel=True, sub_chunk=sub_chunk, chunks=chunks)
    args, in_specs = _with_runs(lay, [q, k, v, g], [lay.q(), lay.k(), lay.v(), lay.g()], runs)
    args.append(states)
    in_specs.append(lay.states())
    kernel = functools.partial(_output_kernel, lay=lay, has_runs=runs is not None,
                               scale=float(scale), dot=common.Dot(q.dtype, interpret),
                               strong_apart=strong_apart, cumulative=cumulative)
    o = _call(kernel, lay, args, in_specs,
              jax.ShapeDtypeStruct((lay.B, lay.Tp, lay.H, lay.V), out_dtype), lay.o(),
              interpret=interpret, num_warps=num_warps, num_stages=num_stages,
              name="gla_output_fwd")
    if not strong_apart:
        return o
    return strong_intra(q, k, v, g, runs, o, lay=lay, scale=scale, interpret=interpret,
                        num_warps=num_warps, num_stages=num_stages, cumulative=cumulative)


def strong_intra(q, k, v, g, runs, o, *, lay, scale, interpret, num_warps, num_stages,
                 cumulative=False):
    """o [B, Tp, H, V] plus the within-chunk term of every tile past the chunk bound (a kernel
    over the chunks in parallel, o updated in place; a program whose tile is within the bound
    only reads its gates). lay: the forward's layout (its sub-chunk tier size)."""
    lay = dataclasses.replace(lay, parallel=True, P=1)
    args, in_specs = _with_runs(lay, [q, k, v, g], [lay.q(), lay.k(), lay.v(), lay.g()], runs)
    args.append(o)
    in_specs.append(lay.o())
    kernel = functools.partial(_strong_intra_kernel, lay=lay, has_runs=runs is not None,
                               scale=float(scale), dot=common.Dot(q.dtype, interpret),
                               cumulative=cumulative)
    return _call(kernel, lay, args, in_specs, jax.ShapeDtypeStruct(o.shape, o.dtype), lay.o(),
                 interpret=interpret, num_warps=num_warps, num_stages=num_stages,
                 name="gla_strong_intra_fwd", aliases={len(args) - 1: 0})


def fused_fwd(q, k, v, g, s0, runs, *, key_gated, scale, chunk_size, block_v, out_dtype,
              interpret=False, num_warps=4, num_stages=2, sub_chunk=0, strong_apart=False,
              strong_warps=8, big_chunks=1, combine=None, cumulative=False):
    """(o [B, Tp, H, V], final state [B, H, K, V] f32) in one sequential walk per program.
    strong_apart: the walk takes the fast within-chunk path only, and tiles past the chunk
    bound get their term from `strong_intra` afterwards (with strong_warps warps).
    big_chunks, combine: the rows of a split time axis, as in `states_fwd` (the final state
    is each row's, [B·NB, H, K, V]). cumulative: g holds b (`load_gates`)."""
    lay = layout(q, v, key_gated=key_gated, chunk_size=chunk_size, block_v=block_v,
                 parallel=False, sub_chunk=sub_chunk)
    args, in_specs = _with_runs(lay, [q, k, v, g], [lay.q(), lay.k(), lay.v(), lay.g()], runs)
    _row_inputs(lay, args, in_specs, s0, big_chunks, combine)
    out_shape = [jax.ShapeDtypeStruct((lay.B, lay.Tp, lay.H, lay.V), out_dtype),
                 jax.ShapeDtypeStruct((lay.B, lay.H, lay.K, lay.V), f32)]
    kernel = functools.partial(_fused_kernel, lay=lay, has_runs=runs is not None,
                               scale=float(scale), dot=common.Dot(q.dtype, interpret),
                               strong_apart=strong_apart, big_chunks=big_chunks,
                               combine=combine is not None, cumulative=cumulative)
    o, sT = _call(kernel, lay, args, in_specs, out_shape, [lay.o(), lay.state()],
                  interpret=interpret, num_warps=num_warps, num_stages=num_stages,
                  name="gla_fused_fwd")
    if strong_apart:
        o = strong_intra(q, k, v, g, runs, o, lay=lay, scale=scale, interpret=interpret,
                         num_warps=strong_warps, num_stages=num_stages, cumulative=cumulative)
    return o, sT

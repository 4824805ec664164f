"""Two-level state passes: the sequential walk over chunks split into rows that run in parallel.

The sequential kernels (`states_fwd`, `dstates_bwd`) run one program per (batch, head, value
block) and walk all N chunks; with few sequences (batch 1 of a long document) that is a handful
of programs on a GPU of 132 multiprocessors, each with N chunk steps on its critical path.
Here the time axis is cut into NB "big chunks" of L chunks each, and the same kernels run on the
[B·NB, L·C] reshaped problem, so B·H·NV·NB programs each walk only L chunks:

    1. local pass (kernels, parallel over big chunks): each big chunk j from a zero state
       (big chunk 0 from the true initial state) gives the local states entering its chunks
       and its local final state F_j.
    2. combine (XLA, log2 NB steps): with D_j the decay of the whole big chunk (the product of
       its chunks' decays e^{Σ g}·survive), the state entering big chunk j beyond the local part is
           E_0 = 0,   E_{j+1} = D_j ⊙ E_j + F_j        (an associative scan of affine maps),
       and the final state is E_NB.
    3. fix-up (XLA, elementwise): the state entering chunk l of big chunk j is
           local_{j,l} + P_{j,l} ⊙ E_j,   P_{j,l} = Π_{m<l} decay_{j,m}.
The decays multiply the key axis (key-gated) or the value axis (value-gated) of the [K, V]
state. Every factor is a product of numbers ≤ 1: nothing overflows, whatever the gate.

Forward without chunk states (no gradient wanted, or recompute_states): step 1 keeps only the
local final states F_j, the combine gives the true state entering every big chunk (s0 for the
first, the state leaving big chunk j − 1 for the others), and the fused kernel (`fused_fwd`:
outputs inside the walk) then walks each big chunk from it, all big chunks in parallel. No
chunk state is written or read back, and no walk is longer than L chunks.

The combine in the kernels (`Tuning.split_combine_in_kernel`; the `*_in_kernel` functions
below): step 1 is a final-state walk that also writes each big chunk's decay D_j, and a second
walk does steps 2 and 3 itself, each program folding the F and D of the big chunks before its
own into its true entering state (gla_fwd.entering_state, at most NB − 1 multiply-adds of a
[K, BV] state) and walking from it: the fused walk (outputs), or the state walk (writing the
true chunk states in time order, [B, H, NB·L·K, V]). No XLA op between the kernels computes a
state.

The backward pass is the mirror image: the gradient of the state leaving each chunk, walked in
reverse, with dsT entering the last big chunk, G_{NB-1} = 0, G_{j-1} = D_j ⊙ G_j + dS0_j (the
local gradients of the states entering the big chunks), fix-up with the suffix products
Π_{m>l} decay_{j,m}, and ds0 = D_0 ⊙ G_0 + dS0_0.

Segments: each row's runs are made relative to the run of the position before the row, so that
the kernels' "run 0 is the one the entering state flows into" holds in every row; the chunk
decays use the global runs (survive = the chunk's last run equals the run before it).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """N chunks padded to NB·L: NB big chunks of L chunks."""

    N: int
    L: int
    NB: int

    @property
    def padded_chunks(self) -> int:
        return self.NB * self.L


def plan(num_programs: int, num_chunks: int, *, below: int, target: int,
         min_chunks: int) -> Optional[SplitPlan]:
    """Split only where the walk runs fewer than `below` programs (0: never): then into the
    fewest big chunks (NB a power of two) that give `target` programs, none shorter than
    `min_chunks` chunks; None where no split is needed or none is worth it."""
    if below <= 0 or num_programs >= below:
        return None
    nb = 1
    while num_programs * nb < target:
        nb *= 2
    while nb > 1 and -(-num_chunks // nb) < min_chunks:
        nb //= 2
    if nb < 2:
        return None
    L = -(-num_chunks // nb)
    nb = -(-num_chunks // L)  # drop big chunks that would be padding only
    return SplitPlan(N=num_chunks, L=L, NB=nb) if nb >= 2 else None


def _pad_time(x, extra: int, mode: str = "constant"):
    if extra == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, extra)
    return jnp.pad(x, pad, mode=mode)


def _rows(x, sp: SplitPlan, C: int):
    """[B, N'·C, ...] -> [B·NB, L·C, ...]."""
    return x.reshape((x.shape[0] * sp.NB, sp.L * C) + x.shape[2:])


def _padded(q, k, v, g, runs, sp: SplitPlan, C: int):
    """Four time-major inputs padded along time to the plan's NB·L chunks (zero k, v, g leave
    a state unchanged, as zero q, v, g, do leave a state gradient; runs repeat their last
    run)."""
    extra = sp.padded_chunks * C - q.shape[1]
    q, k, v, g = (_pad_time(x, extra) for x in (q, k, v, g))
    return q, k, v, g, None if runs is None else _pad_time(runs, extra, mode="edge")


def _row_runs(runs, sp: SplitPlan, C: int):
    return None if runs is None else _relative_runs(runs, sp, C)


def _relative_runs(runs, sp: SplitPlan, C: int):
    """Runs [B, N'·C] -> [B·NB, L·C] with each row's runs counted from the run of the position
    just before the row (0 for the first row)."""
    B = runs.shape[0]
    r = runs.reshape(B, sp.NB, sp.L * C)
    before = jnp.concatenate([jnp.zeros_like(r[:, :1, 0]), r[:, :-1, -1]], axis=1)
    return (r - before[..., None]).reshape(B * sp.NB, sp.L * C)


def chunk_decays(g, runs, sp: SplitPlan, C: int, heads: int):
    """[B, NB, L, H, Dg] float32: e^{Σ_chunk g}·survive per chunk, per query head."""
    B, Tp, Hkv, Dg = g.shape
    log_decay = g.astype(f32).reshape(B, sp.padded_chunks, C, Hkv, Dg).sum(axis=2)
    decay = jnp.exp(log_decay)
    if runs is not None:
        r = runs.reshape(B, sp.padded_chunks, C)
        run_prev = jnp.concatenate([jnp.zeros_like(r[:, :1, 0]), r[:, :-1, -1]], axis=1)
        survive = (r[:, :, -1] == run_prev).astype(f32)
        decay = decay * survive[:, :, None, None]
    decay = jnp.repeat(decay, heads // Hkv, axis=2)
    return decay.reshape(B, sp.NB, sp.L, heads, Dg)


def _apply(decay, state, key_gated: bool):
    """decay [..., Dg] ⊙ state [..., K, V] along the gated axis."""
    return decay[..., :, None] * state if key_gated else decay[..., None, :] * state


def _exclusive_cumprod(x, axis: int, reverse: bool = False):
    """Π of the elements strictly before (after, with reverse) each position along axis."""
    if reverse:
        return jnp.flip(_exclusive_cumprod(jnp.flip(x, axis), axis), axis)
    ones = jnp.ones_like(lax.slice_in_dim(x, 0, 1, axis=axis))
    shifted = jnp.concatenate([ones, lax.slice_in_dim(x, 0, x.shape[axis] - 1, axis=axis)],
                              axis=axis)
    return jnp.cumprod(shifted, axis=axis)


def _affine_scan(a, b, key_gated: bool, reverse: bool = False):
    """Inclusive scan over axis 1 of the maps x -> a_j ⊙ x + b_j (a: [B, NB, H, Dg], b:
    [B, NB, H, K, V]), applied in order of j (reverse: from the last j down)."""
    def combine(first, second):
        a1, b1 = first
        a2, b2 = second
        return a1 * a2, _apply(a2, b1, key_gated) + b2

    return lax.associative_scan(combine, (a, b), axis=1, reverse=reverse)[1]


def _shift(x, reverse: bool):
    """Exclusive from inclusive along axis 1: zeros enter at the start (end with reverse)."""
    zeros = jnp.zeros_like(x[:, :1])
    if reverse:
        return jnp.concatenate([x[:, 1:], zeros], axis=1)
    return jnp.concatenate([zeros, x[:, :-1]], axis=1)


def _per_chunk(local, prefix, entering, sp: SplitPlan, key_gated: bool, dtype):
    """local [B·NB, H, L·K, V] + prefix [B, NB, L, H, Dg] ⊙ entering [B, NB, H, K, V]
    -> [B, H, N·K, V] in dtype (chunk-major rows, padding chunks dropped)."""
    B, NB, H, K, V = entering.shape
    local = local.reshape(B, NB, H, sp.L, K, V).astype(f32)
    prefix = jnp.moveaxis(prefix, 3, 2)  # [B, NB, H, L, Dg]
    full = local + _apply(prefix, entering[:, :, :, None], key_gated)
    full = jnp.moveaxis(full, 1, 2).reshape(B, H, sp.padded_chunks * K, V)
    return full[:, :, :sp.N * K].astype(dtype)


def _local_pass(states_fn, q, k, v, g, s0, runs, *, sp: SplitPlan, C: int, key_gated: bool):
    """Steps 1 and 2 of the module docstring: the big chunks' local walks (states_fn on the
    [B·NB, L·C] rows, big chunk 0 from s0) and their combine. Returns (the padded rows (q, k, v,
    g), their relative runs, states_fn's local chunk states (or None), the chunk decays [B, NB,
    L, H, Dg], the true state leaving each big chunk [B, NB, H, K, V] f32)."""
    B, H = q.shape[0], q.shape[2]
    q, k, v, g, runs = _padded(q, k, v, g, runs, sp, C)
    rows, row_runs = [_rows(x, sp, C) for x in (q, k, v, g)], _row_runs(runs, sp, C)
    s0_rows = jnp.zeros((B, sp.NB) + s0.shape[1:], f32).at[:, 0].set(s0.astype(f32))
    local, final = states_fn(*rows, s0_rows.reshape((B * sp.NB,) + s0.shape[1:]), row_runs)
    decay = chunk_decays(g, runs, sp, C, H)  # [B, NB, L, H, Dg]
    big_decay = jnp.prod(decay, axis=2)  # [B, NB, H, Dg]
    final = final.reshape((B, sp.NB) + final.shape[1:])
    through = _affine_scan(big_decay, final, key_gated)  # state leaving big chunk j
    return rows, row_runs, local, decay, through


def split_states(states_fn, q, k, v, g, s0, runs, *, sp: SplitPlan, C: int, key_gated: bool):
    """`states_fwd` over a split time axis. states_fn(q, k, v, g, s0, runs) is the kernel
    (shapes as `gla_fwd.states_fwd`). Returns (chunk states [B, H, N·K, V] in k's dtype,
    final state [B, H, K, V] f32)."""
    _, _, local, decay, through = _local_pass(states_fn, q, k, v, g, s0, runs, sp=sp, C=C,
                                              key_gated=key_gated)
    entering = _shift(through, reverse=False)
    states = _per_chunk(local, _exclusive_cumprod(decay, axis=2), entering, sp, key_gated,
                        k.dtype)
    return states, through[:, -1]


def split_fused_forward(final_fn, fused_fn, q, k, v, g, s0, runs, *, sp: SplitPlan, C: int,
                        key_gated: bool):
    """The fused forward over a split time axis (module docstring). final_fn(q, k, v, g, s0,
    runs) -> (None, final state) is the state kernel without chunk states, fused_fn(q, k, v, g,
    s0, runs) -> (o, final state) the fused kernel (shapes as `gla_fwd`). Returns (o [B, Tp, H,
    V], final state [B, H, K, V] f32)."""
    rows, row_runs, entering, final = big_chunk_entering_states(
        final_fn, q, k, v, g, s0, runs, sp=sp, C=C, key_gated=key_gated)
    o, _ = fused_fn(*rows, entering, row_runs)
    return from_rows(o, q.shape[0], q.shape[1]), final


def big_chunk_entering_states(final_fn, q, k, v, g, s0, runs, *, sp: SplitPlan, C: int,
                              key_gated: bool):
    """Steps 1 and 2 for a forward that walks the big chunks again from their true entering
    states. final_fn(q, k, v, g, s0, runs) -> (None, final state) is the state kernel without
    chunk states (q: only its shape [B, Tp, H, K] is used). Returns (the padded rows (q, k, v, g)
    [B·NB, L·C, ., .], their relative runs or None, the state entering each big chunk
    [B·NB, H, K, V] f32 (s0 for the first of a row, then the state leaving the one before), the
    final state [B, H, K, V] f32)."""
    B = q.shape[0]
    rows, row_runs, _, _, through = _local_pass(final_fn, q, k, v, g, s0, runs, sp=sp, C=C,
                                                key_gated=key_gated)
    entering = jnp.concatenate([s0.astype(f32)[:, None], through[:, :-1]], axis=1)
    return rows, row_runs, entering.reshape((B * sp.NB,) + s0.shape[1:]), through[:, -1]


def from_rows(x, B: int, Tp: int):
    """[B·NB, L·C, ...] rows back to [B, Tp, ...] (the padding chunks dropped)."""
    return x.reshape((B, -1) + x.shape[2:])[:, :Tp]


def _per_batch(x, sp: SplitPlan):
    """[B·NB, ...] per row -> [B, NB, ...]."""
    return x.reshape((-1, sp.NB) + x.shape[1:])


def _big_chunk_walks(final_fn, q, k, v, g, s0, runs, sp: SplitPlan, C: int):
    """Step 1 for the in-kernel combine: each big chunk's walk from its own start (big chunk 0
    from s0). Returns (the padded rows (q, k, v, g), their relative runs, the combine's inputs
    (F [B, NB, H, K, V]: the state leaving each big chunk, D [B, NB, H, NV, DG]: its decay))."""
    q, k, v, g, runs = _padded(q, k, v, g, runs, sp, C)
    rows, row_runs = [_rows(x, sp, C) for x in (q, k, v, g)], _row_runs(runs, sp, C)
    _, leaving, decay = final_fn(*rows, s0, row_runs, big_chunks=sp.NB, decay=True)
    return rows, row_runs, (_per_batch(leaving, sp), _per_batch(decay, sp))


def _time_order(states, sp: SplitPlan, K: int):
    """Chunk states [B, H, NB·L·K, V] written in time order, the padding chunks dropped."""
    return states if states.shape[2] == sp.N * K else states[:, :, :sp.N * K]


def split_fused_forward_in_kernel(final_fn, fused_fn, q, k, v, g, s0, runs, *, sp: SplitPlan,
                                  C: int):
    """`split_fused_forward` with the combine (step 2) inside the fused walk
    (Tuning.split_combine_in_kernel): the final-state kernel writes each big chunk's leaving
    state F_j and decay D_j, and each program of the fused walk folds those of the big chunks
    before its own into its entering state (gla_fwd.entering_state) before walking. The XLA
    steps between the kernels (chunk decays, the associative scan, the entering states) go;
    the fold is ≤ NB − 1 steps of one [K, BV] multiply-add per program. final_fn and fused_fn
    as in split_fused_forward, taking big_chunks (and decay / combine). Returns (o [B, Tp, H,
    V], final state [B, H, K, V] f32: the last big chunk's walk ends at it)."""
    rows, row_runs, combine = _big_chunk_walks(final_fn, q, k, v, g, s0, runs, sp, C)
    o, leaving = fused_fn(*rows, s0, row_runs, big_chunks=sp.NB, combine=combine)
    return from_rows(o, q.shape[0], q.shape[1]), _per_batch(leaving, sp)[:, -1]


def split_states_in_kernel(final_fn, states_fn, q, k, v, g, s0, runs, *, sp: SplitPlan,
                           C: int):
    """`split_states` with the combine and fix-up inside a second walk
    (Tuning.split_combine_in_kernel): the final-state kernel writes each big chunk's leaving
    state and decay, and the state kernel walks every big chunk again from its true entering
    state (gla_fwd.entering_state), writing the true chunk states in time order. One more
    walk (without stores) instead of the XLA chunk decays, scan and fix-up (a float32 pass
    reading and writing every chunk state). Returns (chunk states [B, H, N·K, V] in k's dtype,
    final state [B, H, K, V] f32)."""
    rows, row_runs, combine = _big_chunk_walks(final_fn, q, k, v, g, s0, runs, sp, C)
    states, leaving = states_fn(*rows, s0, row_runs, big_chunks=sp.NB, combine=combine)
    return _time_order(states, sp, q.shape[-1]), _per_batch(leaving, sp)[:, -1]


def split_fused_fixup_forward(fused_fn, q, k, v, g, s0, runs, *, sp: SplitPlan, C: int,
                              key_gated: bool, scale: float, out_dtype):
    """The fused forward over a split time axis in ONE walk (`Tuning.split_fixup`): each big
    chunk's fused walk runs from a zero state (big chunk 0 from s0) while the combine is not
    known yet, and the outputs are fixed up afterwards with the state each walk missed:

        o_t = o_t^local + scale · (q_t ⊙ Λ_t) M_j          (key-gated; value-gated:
                                                             o_t^local + scale · (q_t M_j) ⊙ Λ_t)

    with M_j the true state entering big chunk j (0 for j = 0, whose walk had s0), and
    Λ_t = Π_{m<l} decay_{j,m} · exp(Σ_{τ ≤ t in chunk l} g_τ) · [no new segment since the
    big chunk began] the decay from the big chunk's start through t: a product of numbers
    ≤ 1, nothing overflows. fused_fn(q, k, v, g, s0, runs) -> (o, final state) must return
    float32 outputs (the sum is rounded once, to out_dtype). Against split_fused_forward this
    trades the second walk over k, v, g for one pass over q, g and o. Returns (o [B, Tp, H, V]
    in out_dtype, final state [B, H, K, V] f32)."""
    B, Tp, H, K = q.shape
    rows, row_runs, local, decay, through = _local_pass(
        fused_fn, q, k, v, g, s0, runs, sp=sp, C=C, key_gated=key_gated)
    missing = _shift(through, reverse=False)                       # [B, NB, H, K, V]
    q_rows, g_rows = rows[0], rows[3]                              # [B·NB, L·C, ., .]
    Hkv, Dg = g_rows.shape[2:]
    shape = (B, sp.NB, sp.L, C)
    within = jnp.exp(jnp.cumsum(g_rows.astype(f32).reshape(shape + (Hkv, Dg)), axis=3))
    within = jnp.repeat(within, H // Hkv, axis=4)                  # [B, NB, L, C, H, Dg]
    lam = within * _exclusive_cumprod(decay, axis=2)[:, :, :, None]
    if row_runs is not None:   # a new segment inside the big chunk cuts the entering state
        lam = lam * (row_runs.reshape(shape) == 0).astype(f32)[..., None, None]
    qr = q_rows.astype(f32).reshape(shape + (H, K))
    if key_gated:
        fix = jnp.einsum("bjlchk,bjhkv->bjlchv", qr * lam, missing)
    else:
        fix = jnp.einsum("bjlchk,bjhkv->bjlchv", qr, missing) * lam
    o = local.reshape(fix.shape) + scale * fix
    o = o.reshape((B, sp.padded_chunks * C) + o.shape[-2:])
    return o[:, :Tp].astype(out_dtype), through[:, -1]


def split_dstates(dstates_fn, q, v, g, runs, do, dsT, *, sp: SplitPlan, C: int,
                  key_gated: bool):
    """`dstates_bwd` over a split time axis; dstates_fn(q, v, g, runs, do, dsT) is the kernel.
    Returns (gradients of the states leaving each chunk [B, H, N·K, V] in q's dtype, gradient
    of the initial state [B, H, K, V] f32)."""
    B, H = q.shape[0], q.shape[2]
    q, v, g, do, runs = _padded(q, v, g, do, runs, sp, C)
    dsT_rows = jnp.zeros((B, sp.NB) + dsT.shape[1:], f32).at[:, -1].set(dsT.astype(f32))
    local, ds0 = dstates_fn(
        _rows(q, sp, C), _rows(v, sp, C), _rows(g, sp, C),
        None if runs is None else _relative_runs(runs, sp, C), _rows(do, sp, C),
        dsT_rows.reshape((B * sp.NB,) + dsT.shape[1:]))
    decay = chunk_decays(g, runs, sp, C, H)
    big_decay = jnp.prod(decay, axis=2)
    ds0 = ds0.reshape((B, sp.NB) + ds0.shape[1:])
    # gradient of the state entering big chunk j, from j and everything after it
    into = _affine_scan(big_decay, ds0, key_gated, reverse=True)
    leaving = _shift(into, reverse=True)  # of the state leaving big chunk j, from later ones
    dstates = _per_chunk(local, _exclusive_cumprod(decay, axis=2, reverse=True), leaving, sp,
                         key_gated, q.dtype)
    return dstates, into[:, 0]


def split_dstates_in_kernel(final_fn, dstates_fn, q, v, g, runs, do, dsT, *, sp: SplitPlan,
                            C: int):
    """`split_dstates` with the combine and fix-up inside a second walk
    (Tuning.split_combine_in_kernel), the mirror of split_states_in_kernel: the final walk
    (final_fn: dstates_bwd with final_only) gives each big chunk's gradient of its entering
    state from its own end (the last big chunk's from dsT) and its decay; the second walk
    (dstates_fn) starts each big chunk from its true leaving gradient, folded in the kernel
    from the big chunks after it (gla_fwd.entering_state with reverse). Returns (gradients of
    the states leaving each chunk [B, H, N·K, V] in q's dtype, gradient of the initial state
    [B, H, K, V] f32: the first big chunk's walk ends at it)."""
    q, v, g, do, runs = _padded(q, v, g, do, runs, sp, C)
    rows = [_rows(x, sp, C) for x in (q, v, g)]
    args = (*rows, _row_runs(runs, sp, C), _rows(do, sp, C), dsT)
    _, entering, decay = final_fn(*args, big_chunks=sp.NB, decay=True)
    dstates, ds0 = dstates_fn(*args, big_chunks=sp.NB,
                              combine=(_per_batch(entering, sp), _per_batch(decay, sp)))
    return _time_order(dstates, sp, q.shape[-1]), _per_batch(ds0, sp)[:, 0]

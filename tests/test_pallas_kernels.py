"""The Pallas kernels (impl="pallas", run by Pallas' interpreter on the CPU) against the float64
recurrent form: outputs, final states and the gradients of every input and both initial states.

The kernels compute in float32 (states, accumulation), so they are compared with a float64
reference by relative error, on float32 copies of fresh random inputs. Cases cover the kernel
paths: several K/V/M (wide key dims in slices, wide value dims in blocks), T not a multiple of
the chunk, one step, grouped heads, packed segments, the fused and the split forward, recomputed
chunk states, and gates strong enough for the exact in-kernel path.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsa_jax.ops import gated_slot_attention
from ops_util import enable_x64, gsa_inputs, relative_error
from pallas_kernels import common as pcommon
from pallas_kernels import gla as pgla

# name: (B, T, H, Hkv, K, V, M, chunk, segments, initial state)
CASES = {
    "K16_V32_M16_ragged": (1, 40, 2, 2, 16, 32, 16, 16, False, True),
    "K32_V16_M32_gqa": (2, 37, 4, 2, 32, 16, 32, 16, False, True),
    "K16_V16_M64_no_state": (1, 48, 2, 2, 16, 16, 64, 16, False, False),
    "segments_C32": (2, 70, 2, 1, 16, 16, 16, 32, True, True),
    "T1": (2, 1, 2, 2, 16, 16, 16, 16, False, True),
    # K above MAX_KEY_DIM (pass 1 in key slices), V = 3 value blocks, M = 128 + 128 slots
    "wide_K512_V384_M256": (1, 20, 2, 1, 512, 384, 256, 16, False, True),
}
F32_REL = 2e-4  # float32 kernels vs the float64 recurrence


def _slow(*values):
    """One parametrized case that runs in CI's slow tier only. The tests with many interpreted
    cases (launch variants, walks, big-chunk layouts: ~7-16 s each on 2 cores) keep their
    default and one or two others in the fast tier (the README's command); the rest run in CI."""
    return pytest.param(*values, marks=pytest.mark.slow)


def _segments(seed, B, T):
    """Random packed-document ids [B, T]: non-decreasing, several documents per row."""
    rng = np.random.default_rng(seed)
    starts = rng.random((B, T)) < 0.12
    starts[:, 0] = False
    return np.cumsum(starts, axis=1).astype(np.int32)


@functools.lru_cache(maxsize=None)
def _value_and_grads(impl, chunk_size, with_state, with_segments, recompute=False):
    """jit of (inputs, cotangents, segment_ids) -> (o, (Hk, Hv), grads of inputs and states)."""
    def run(q, k, v, s, g, hk0, hv0, segment_ids):
        kw = dict(recompute_states=True) if recompute else {}
        return gated_slot_attention(
            q, k, v, s, g, initial_state=(hk0, hv0) if with_state else None,
            return_final_state=True, segment_ids=segment_ids if with_segments else None,
            impl=impl, chunk_size=chunk_size, **kw)

    def fn(args, cotangents, segment_ids):
        out, vjp = jax.vjp(lambda *a: run(*a, segment_ids), *args)
        return out, vjp(cotangents)

    return jax.jit(fn)


def _case_inputs(seed, case, dtype):
    B, T, H, Hkv, K, V, M, C, segs, state = CASES[case]
    x = gsa_inputs(seed, B, T, H, Hkv, K, V, M, dtype=np.float64)
    rng = np.random.default_rng(seed + 1)
    hk0 = x.hk0 if state else np.zeros((B, Hkv, K, M))  # unused without a state
    hv0 = x.hv0 if state else np.zeros((B, Hkv, M, V))
    args = (x.q, x.k, x.v, x.s, x.g, hk0, hv0)
    cot = (rng.standard_normal((B, T, H, V)),
           (rng.standard_normal((B, Hkv, K, M)), rng.standard_normal((B, Hkv, M, V))))
    seg = _segments(seed + 2, B, T)
    cast = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)
    return cast(args), cast(cot), jnp.asarray(seg), (C, state, segs)


def _reference(seed, case):
    with enable_x64():
        args, cot, seg, (C, state, segs) = _case_inputs(seed, case, jnp.float64)
        out, grads = _value_and_grads("recurrent", C, state, segs)(args, cot, seg)
        return jax.tree.map(np.asarray, (out, grads))


def _assert_rel(actual, expected, tol, what):
    expected = np.asarray(expected, np.float64)
    assert np.abs(expected).max() > 0, f"reference {what} is zero: test is vacuous"
    assert np.all(np.isfinite(np.asarray(actual, np.float64))), what
    err = relative_error(actual, expected)
    assert err < tol, f"{what}: relative error {err:.2e} >= {tol:.0e}"


NAMES = ("dq", "dk", "dv", "ds", "dg", "dHk0", "dHv0")


def _compare(out, grads, ref_out, ref_grads, tol, with_state, dg_atol=None):
    """Relative errors below tol; dg by absolute error instead where dg_atol is given."""
    (o, (hk, hv)), (ro, (rhk, rhv)) = out, ref_out
    _assert_rel(o, ro, tol, "o")
    _assert_rel(hk, rhk, tol, "final Hk")
    _assert_rel(hv, rhv, tol, "final Hv")
    names = NAMES if with_state else NAMES[:5]
    for name, gp, gr in zip(names, grads, ref_grads):
        if name == "dg" and dg_atol is not None:
            err = np.abs(np.asarray(gp, np.float64) - gr).max()
            assert err < dg_atol, f"dg: absolute error {err:.2e} >= {dg_atol:.0e}"
            continue
        _assert_rel(gp, gr, tol, name)


# The widest case (K = 512 in key slices, ~25 s interpreted) in CI's second step.
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c.startswith("wide")
                                  else c for c in CASES])
def test_kernels_match_recurrent_float64(case):
    seed = 100 + list(CASES).index(case)
    ref_out, ref_grads = _reference(seed, case)
    args, cot, seg, (C, state, segs) = _case_inputs(seed, case, jnp.float32)
    out, grads = _value_and_grads("pallas", C, state, segs)(args, cot, seg)
    _compare(out, grads, ref_out, ref_grads, F32_REL, state)


TUNED_PATHS = {
    "split_forward": dict(fused_max_chunks=0),
    "backward_value_block": dict(block_v_bwd=16),
    # two-level state passes: 3 chunks in 2 big chunks of 2 (one padding chunk), segments
    "two_level_states": dict(split_below_programs=10 ** 6, split_programs=10 ** 6,
                             split_min_chunks=2),
}


@pytest.mark.parametrize("path", [*TUNED_PATHS, "recompute_states"])
def test_forward_paths_and_recomputation(path):
    """The split forward (state pass + chunk-parallel output, taken past `fused_max_chunks`),
    recomputed chunk states, a backward value block smaller than the forward's
    (`block_v_bwd`: pass 2's V = 32 in two blocks) and the two-level state passes (big chunks
    walked in parallel, then combined) give the reference values and gradients."""
    case = "K16_V32_M16_ragged" if path == "backward_value_block" else "segments_C32"
    seed = 200
    ref_out, ref_grads = _reference(seed, case)
    args, cot, seg, (C, state, segs) = _case_inputs(seed, case, jnp.float32)
    with pgla.tuning(**TUNED_PATHS.get(path, {})):
        if path in TUNED_PATHS:
            # a fresh jit (not the cached one): the tuning is read when the kernels are traced
            fn = _value_and_grads.__wrapped__("pallas", C, state, segs)
        else:
            fn = _value_and_grads("pallas", C, state, segs, recompute=True)
        out, grads = fn(args, cot, seg)
        # forward only, no gradient: the fused walk when the chunk count allows it
        o_only = jax.jit(lambda *a: gated_slot_attention(
            *a[:5], initial_state=(a[5], a[6]), segment_ids=a[7] if segs else None, impl="pallas",
            chunk_size=C)[0])(*args, seg)
    _compare(out, grads, ref_out, ref_grads, F32_REL, state)
    _assert_rel(o_only, ref_out[0], F32_REL, "o without gradient")


ARITHMETIC = ("exp", "mul", "add", "reduce_sum", "reduce_prod", "cumsum", "cumprod")


def _xla_arithmetic(C, args, seg, cot=None, **tuning):
    """{primitive: count} of the arithmetic outside the Pallas kernels in a GSA forward (with
    cot: forward and backward) traced under a tuning: a combine left in XLA shows up here,
    GSA's own softmax and gradient sums are there always."""
    def forward(*a):
        return _forward(a[:7], a[7], "pallas", C)

    def forward_backward(*a):
        out, vjp = jax.vjp(lambda *x: forward(*x, a[7]), *a[:7])
        return out, vjp(cot)

    with pgla.tuning(**tuning):
        jaxpr = jax.make_jaxpr(forward if cot is None else forward_backward)(*args, seg)
    ops = _xla_ops(jaxpr.jaxpr)
    return {name: ops[name] for name in ARITHMETIC}


def _xla_ops(jaxpr, counts=None):
    """Primitive counts of a jaxpr outside its Pallas kernels (nested jaxprs included)."""
    import collections
    from jax._src import core
    counts = collections.Counter() if counts is None else counts
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            continue
        counts[eqn.primitive.name] += 1
        for sub in core.jaxprs_in_params(eqn.params):
            _xla_ops(sub, counts)
    return counts


# (segments_C32 with the XLA combine: test_forward_paths_and_recomputation[two_level_states])
# One case per combine in the fast tier; the other four (~11 s each interpreted) in CI's slow tier.
@pytest.mark.parametrize("case,in_kernel", [
    ("K32_V16_M32_gqa", False), _slow("K16_V16_M64_no_state", False),
    _slow("segments_C32", True), _slow("K32_V16_M32_gqa", True),
    _slow("K16_V16_M64_no_state", True), ("value_blocks", True)])
def test_two_level_state_passes_on_more_cases(case, in_kernel):
    """Packed segments with an initial state (3 chunks, big chunks of 2 with padding), grouped
    heads with an initial state (3 chunks, each its own big chunk) and no initial state
    through the two-level state passes, forward split so that the entering states are used;
    the combine in XLA, or in the kernels (`split_combine_in_kernel`: a final-state walk,
    then the state walk from each big chunk's true entering state, folded in the kernel; the
    backward's state-gradient walks likewise from the end), also with value blocks of 8
    (value_blocks: K16_V32_M16_ragged, both passes in several blocks, each with its own
    decay slice (value gate) or copy (key gate))."""
    seed = 210
    blocks = {}
    if case == "value_blocks":
        case, blocks = "K16_V32_M16_ragged", dict(block_v=8, block_v_bwd=8)
    ref_out, ref_grads = _reference(seed, case)
    args, cot, seg, (C, state, segs) = _case_inputs(seed, case, jnp.float32)
    min_chunks = 1 if case == "K32_V16_M32_gqa" else 2
    with pgla.tuning(split_below_programs=10 ** 6, split_programs=10 ** 6,
                     split_min_chunks=min_chunks, fused_max_chunks=0,
                     split_combine_in_kernel=in_kernel, **blocks):
        fn = _value_and_grads.__wrapped__("pallas", C, state, segs)
        out, grads = fn(args, cot, seg)
        split = pgla.current_tuning()
    _compare(out, grads, ref_out, ref_grads, F32_REL, state)
    if in_kernel:   # both combines left XLA: the arithmetic of unsplit passes
        unsplit = _xla_arithmetic(C, args, seg, cot, fused_max_chunks=0)
        assert _xla_arithmetic(C, args, seg, cot, **dataclasses.asdict(split)) == unsplit


# Fast tier: each walk on one case (packed segments; grouped heads over big chunks of 2);
# the other cases (~10-16 s each interpreted) and the fixup run in CI's slow tier.
FUSED_FAST = {("segments_C32", "two_walks"), ("K32_V16_M32_gqa", "in_kernel")}


@pytest.mark.parametrize("case,max_chunks,mode", [
    (case, chunks, mode) if (case, mode) in FUSED_FAST else _slow(case, chunks, mode)
    for case, chunks in [("segments_C32", 1), ("K32_V16_M32_gqa", 2),
                         ("K16_V16_M64_no_state", 1), ("value_blocks", 1)]
    for mode in ("two_walks", "in_kernel", "fixup")])
def test_fused_forward_over_big_chunks(case, max_chunks, mode):
    """A forward without gradient on few programs: final states of the big chunks, their
    combine, then the fused walk of every big chunk from its true entering state
    (two_level.split_fused_forward); the same with the combine folded inside the fused walk
    (in_kernel: split_fused_forward_in_kernel, no XLA op between the kernels computes a
    state); or (fixup, ~1 min of interpreting: tier 2) one fused walk of every big chunk from a
    zero state and the outputs fixed up with the state it missed (split_fused_fixup_forward).
    3 chunks: big chunks of 2 (one padding chunk), or of 1 where `fused_max_chunks` = 1 caps
    them (3 big chunks: a fold of two); packed segments, grouped heads, no initial state.
    Outputs and final states against the float64 recurrence, and the same as the split pair
    (`fused_split` off) to float32 rounding. value_blocks: K16_V32_M16_ragged in value blocks
    of 8 (several walks per head, each with its slice or copy of the decays)."""
    fixup = mode == "fixup"
    blocks = {}
    if case == "value_blocks":
        case, blocks = "K16_V32_M16_ragged", dict(block_v=8)
    seed = 220
    ref_out, _ = _reference(seed, case)
    args, _, seg, (C, state, segs) = _case_inputs(seed, case, jnp.float32)

    def forward(**tuning):
        with pgla.tuning(split_below_programs=10 ** 6, split_programs=10 ** 6,
                         split_min_chunks=2, fused_max_chunks=max_chunks, **blocks, **tuning):
            return jax.jit(lambda *a: gated_slot_attention(
                *a[:5], initial_state=(a[5], a[6]) if state else None, return_final_state=True,
                segment_ids=a[7] if segs else None, impl="pallas", chunk_size=C))(*args, seg)

    walk = dict(split_fixup=fixup, split_combine_in_kernel=mode == "in_kernel")
    o, (hk, hv) = forward(**walk)
    if mode == "in_kernel":   # no XLA op between the kernels: an unsplit forward's arithmetic
        assert _xla_arithmetic(C, args, seg, split_below_programs=10 ** 6,
                               split_programs=10 ** 6, split_min_chunks=2,
                               fused_max_chunks=max_chunks, **blocks, **walk) == \
            _xla_arithmetic(C, args, seg, **blocks)
    ro, (rhk, rhv) = ref_out
    _assert_rel(o, ro, F32_REL, "o")
    _assert_rel(hk, rhk, F32_REL, "final Hk")
    _assert_rel(hv, rhv, F32_REL, "final Hv")
    o_pair, _ = forward(fused_split=False)
    _assert_rel(o, o_pair, 1e-5, "o against the split pair")


def test_two_level_plan():
    """Enough big chunks for the wanted programs (a power of two), none shorter than the minimum
    chunk count, no big chunk of padding only, and no split where it is not needed."""
    from pallas_kernels.two_level import plan
    kw = dict(below=128, target=512, min_chunks=8)
    assert plan(128, 64, **kw) is None                                # already enough programs
    assert plan(16, 64, **{**kw, "below": 0}) is None                 # switched off
    sp = plan(16, 1024, **kw)                                         # 1 x 65536, H = 16
    assert (sp.NB, sp.L) == (32, 32)
    sp = plan(16, 100, **kw)                                          # capped by the chunk count
    assert sp.L >= 8 and sp.NB * sp.L >= 100 and (sp.NB - 1) * sp.L < 100
    assert plan(16, 12, **kw) is None                                 # too short to split


def test_strong_gates_take_the_exact_path():
    """g = -20 per step: every chunk's decay exceeds the fast path's bound (MAX_CHUNK_DECAY);
    values and gradients still match the reference, nothing overflows.

    dg is then ~1e-9 of the other gradients: the chunked backward (kernels and the pure-JAX
    chunk form alike) forms it as a reverse cumulative sum of O(1) terms, so float32 resolves
    it to an absolute ~1e-7 only, which is what the test asks of it."""
    case = "K16_V32_M16_ragged"
    seed = 300
    B, T, H, Hkv, K, V, M, C, _, _ = CASES[case]

    def strong(args):
        q, k, v, s, g, hk0, hv0 = args
        return (q, k, v, s, g * 0 - 20.0 + 0.5 * jnp.tanh(g), hk0, hv0)

    with enable_x64():
        args, cot, seg, _ = _case_inputs(seed, case, jnp.float64)
        args = strong(args)
        assert float(jnp.max(-jnp.sum(args[4][:, :C], axis=1))) > pgla.MAX_CHUNK_DECAY
        ref_out, ref_grads = jax.tree.map(
            np.asarray, _value_and_grads("recurrent", C, True, False)(args, cot, seg))
    args, cot, seg, _ = _case_inputs(seed, case, jnp.float32)
    out, grads = _value_and_grads("pallas", C, True, False)(strong(args), cot, seg)
    scale = max(np.abs(g).max() for g in ref_grads[:4])  # dq, dk, dv, ds: O(1)..O(10)
    _compare(out, grads, ref_out, ref_grads, F32_REL, True, dg_atol=1e-7 * scale)


def _sharp_tile(seed, key_gated, segments, C=32, sub=8, K=16, V=12, per_step=-5.0):
    """One chunk's float64 inputs whose gate decays every channel by ~|per_step|·C over the
    chunk (past MAX_CHUNK_DECAY at -5 x 32) but ~|per_step|·sub per sub-chunk (within it)."""
    from pallas_kernels import chunk_math, common
    rng = np.random.default_rng(seed)
    D = K if key_gated else V
    q, k = rng.standard_normal((C, K)), rng.standard_normal((C, K))
    v, do = rng.standard_normal((C, V)), rng.standard_normal((C, V))
    g = per_step + 0.5 * np.tanh(rng.standard_normal((C, D)))
    runs = (np.cumsum(rng.random(C) < 0.15) if segments else np.zeros(C)).astype(np.int32)
    masks = common.chunk_masks(jnp.asarray(runs), slice(None), jnp.int32(0),
                               common.causal_mask(C))
    gt = chunk_math.gates(jnp.asarray(g), masks)
    return tuple(map(jnp.asarray, (q, k, v, do, g))), gt, masks


def _direct_intra(q, k, v, b, intra, key_gated, scale):
    """Float64 within-chunk output straight from the definition, one decay per pair:
    o_t = Σ_{i ≤ t, same document} scale · (q_t ⊙ e^{b_t − b_i}) · k_i v_i (key gate) or
    scale · (q_t · k_i) e^{b_t − b_i} ⊙ v_i (value gate); differentiable in b."""
    diff = jnp.where(intra[:, :, None], b[:, None, :] - b[None, :, :], -jnp.inf)
    decay = jnp.exp(diff)                                                   # [t, i, D]
    if key_gated:
        A = scale * jnp.einsum("tk,ik,tik->ti", q, k, decay)
        return A @ v
    return scale * jnp.einsum("tk,ik,tiv,iv->tv", q, k, decay, v)


@pytest.mark.parametrize("key_gated", [True, False], ids=["key_gate", "value_gate"])
@pytest.mark.parametrize("segments", [False, True], ids=["one_doc", "segments"])
def test_sub_chunk_tier_matches_the_definition(key_gated, segments):
    """The sub-chunk tier (chunk_math.intra_output_sub / intra_grads_sub: sums of factored
    terms, float32 inside as in the kernels) against the definition in float64 (one decay per
    pair; gradients by autodiff, db the gradient of the cumulative gate b), output and every
    gradient, on a tile past the chunk bound with every sub-chunk within it; the exact loop
    the tier replaces is held to the same reference, and the predicates pick the tier."""
    from pallas_kernels import chunk_math, common
    sub, scale = 8, 0.3
    with enable_x64():
        (q, k, v, do, g), gt, masks = _sharp_tile(7 + 2 * key_gated + segments, key_gated,
                                                  segments, sub=sub)
        assert bool(chunk_math.is_extreme(gt)) and not bool(chunk_math.is_sub_extreme(gt, sub))
        ref_o, vjp = jax.vjp(lambda q, k, v, b: _direct_intra(q, k, v, b, masks.intra,
                                                              key_gated, scale),
                             q, k, v, gt.b)
        ref = (ref_o,) + vjp(do)
        kw = dict(key_gated=key_gated, scale=scale)
        dot = common.Dot(jnp.float32, interpret=True)
        q32, k32, v32, do32, g32 = (x.astype(jnp.float32) for x in (q, k, v, do, g))
        gt32 = chunk_math.gates(g32, masks)
        for name, o, grads in (
                ("sub-chunk tier",
                 chunk_math.intra_output_sub(q32, k32, v32, gt32, masks, dot=dot, sub=sub, **kw),
                 chunk_math.intra_grads_sub(q32, k32, v32, do32, gt32, masks, dot=dot, sub=sub,
                                            **kw)),
                ("exact loop", chunk_math._intra_output_exact(q32, k32, v32, gt32, masks, **kw),
                 chunk_math._intra_grads_exact(q32, k32, v32, do32, gt32, masks, **kw))):
            for what, a, b in zip(("o", "dq", "dk", "dv", "db"), (o,) + tuple(grads), ref):
                _assert_rel(a, np.asarray(b), 2e-5, f"{name} {what}")


@pytest.mark.parametrize("key_gated", [pytest.param(True, marks=pytest.mark.slow), False],
                         ids=["key_gate", "value_gate"])  # key_gate: 19 s, CI's second step
def test_bf16_gate_gradient_of_the_factored_paths(key_gated):
    """With bf16 matmuls (the kernels' dtype for bf16 inputs), the gate gradient of the
    factored paths against the float64 definition: db = dq̂ ⊙ q̂ − dk̂ ⊙ k̂ cancels the diagonal
    pairs (decay 1, no gradient) only if it multiplies by the operands the matmuls rounded
    (Dot.rounded). Multiplying by the unrounded float32 ones left a residue of 32% (sub-chunk
    tier, -5 per step) and 2.2% (-2.5, sub-chunks of 16); the exact loop (float32 throughout)
    is the yardstick. The fast path on a mild tile is held to the same bound."""
    from pallas_kernels import chunk_math, common
    scale = 0.3
    dot = common.Dot(jnp.bfloat16, interpret=True)
    kw = dict(key_gated=key_gated, scale=scale)
    for per_step, sub, C, path in ((-5.0, 8, 32, "sub"), (-2.5, 16, 64, "sub"),
                                   (-0.3, 16, 64, "fast")):
        with enable_x64():
            (q, k, v, do, g), gt, masks = _sharp_tile(11, key_gated, False, C=C, sub=sub,
                                                      K=32, V=32, per_step=per_step)
            _, vjp = jax.vjp(lambda q, k, v, b: _direct_intra(q, k, v, b, masks.intra,
                                                              key_gated, scale), q, k, v, gt.b)
            ref_db = np.asarray(vjp(do)[3])
        bf = [x.astype(jnp.bfloat16) for x in (q, k, v, do)]
        gt32 = chunk_math.gates(g.astype(jnp.float32), masks)
        assert bool(chunk_math.is_extreme(gt32)) == (path == "sub")
        if path == "sub":
            db = chunk_math.intra_grads_sub(*bf, gt32, masks, dot=dot, sub=sub, **kw)[3]
        else:
            db = chunk_math.intra_grads_fast(*bf, gt32, masks, dot=dot, **kw)[3]
        exact_db = chunk_math._intra_grads_exact(*bf, gt32, masks, **kw)[3]
        err, exact_err = relative_error(db, ref_db), relative_error(exact_db, ref_db)
        assert err < max(1e-2, 2 * exact_err), (per_step, sub, path, err, exact_err)


def test_sub_chunk_auto_size():
    """Tuning.sub_chunk = None (the default) takes 16 where it divides a larger chunk and
    turns the tier off otherwise (a chunk of 16 or less has nothing to split, and a size
    that does not divide would be refused); an explicit size is checked."""
    assert pgla.Tuning().sub_chunk is None
    assert [pgla.sub_chunk_for(None, C) for C in (64, 32, 128, 16, 8, 24, 48)] == [
        16, 16, 16, 0, 0, 0, 16]
    assert pgla.sub_chunk_for(8, 32) == 8 and pgla.sub_chunk_for(0, 64) == 0
    for bad in (12, -16):
        with pytest.raises(ValueError, match="must divide the chunk size"):
            pgla.sub_chunk_for(bad, 32)


def test_sub_chunk_predicate_sends_sharper_tiles_to_the_exact_loop():
    """At -20 per step a sub-chunk of 8 decays by ~160: past the bound, so the tile keeps the
    exact loop; at -5 per step (~40 per sub-chunk) it does not."""
    from pallas_kernels import chunk_math
    with enable_x64():
        _, sharp, _ = _sharp_tile(3, True, False, per_step=-20.0)
        _, mid, _ = _sharp_tile(3, True, False, per_step=-5.0)
        assert bool(chunk_math.is_sub_extreme(sharp, 8))
        assert not bool(chunk_math.is_sub_extreme(mid, 8))
        assert bool(chunk_math.is_sub_extreme(mid, 32))   # one sub-chunk = the whole chunk


def _sharp_gates(args):
    """The GSA inputs with gates of ~-5 per step in the first half of the sequence and ~-20 in
    the second (each jittered by the original gate)."""
    q, k, v, s, g, hk0, hv0 = args
    T = q.shape[1]
    per_step = jnp.where(jnp.arange(T)[None, :, None, None] < T // 2, -5.0, -20.0)
    return (q, k, v, s, g * 0 + per_step + 0.5 * jnp.tanh(g), hk0, hv0)


def test_kernels_with_the_sub_chunk_tier_match_float64():
    """The kernels with Tuning.sub_chunk = 8 (chunk 32, packed segments, an initial state):
    gates at ~-5 per step for the first half of the sequence (tiles past the chunk bound,
    sub-chunks within it: the sub-chunk tier) and ~-20 for the second (sub-chunks past it too:
    the exact loop); values and gradients match the float64 recurrence. (The gate's gradient
    is not tiny here, as it is at -20 throughout: relative error, like the others.)"""
    case, seed = "segments_C32", 320
    B, T, H, Hkv, K, V, M, C, _, _ = CASES[case]
    sharp = _sharp_gates

    with enable_x64():
        args, cot, seg, _ = _case_inputs(seed, case, jnp.float64)
        ref_out, ref_grads = jax.tree.map(
            np.asarray, _value_and_grads("recurrent", C, True, True)(sharp(args), cot, seg))
    args, cot, seg, _ = _case_inputs(seed, case, jnp.float32)
    conds = {}
    for sub in (0, 8):
        with pgla.tuning(sub_chunk=sub):
            # a fresh jit (not the cached one): the tuning is read when the kernels are traced
            fn = _value_and_grads.__wrapped__("pallas", C, True, True)
            conds[sub] = str(jax.make_jaxpr(fn)(sharp(args), cot, seg)).count("cond[")
            if sub:
                out, grads = fn(sharp(args), cot, seg)
    # the tier is in the kernels: each intra-chunk branch gains the nested sub-chunk branch
    assert conds[0] > 0 and conds[8] == 2 * conds[0], conds
    _compare(out, grads, ref_out, ref_grads, F32_REL, True)


def test_tile_classification_is_exact_and_near_the_float_one():
    """is_extreme_tile (what the strong-apart kernels agree on): hand cases at the bound (a
    sum of exactly -120 is within it, -120.064 past it; one step below -1024 is past it
    whatever the rest), the same answer for any order of the steps (an exact integer sum),
    and the float classification's answer wherever the sum is more than C / 1024 from the
    bound."""
    from pallas_kernels import chunk_math, common
    C = 64
    assert not bool(chunk_math.is_extreme_tile(jnp.full((C, 4), -120.0 / C)))
    assert bool(chunk_math.is_extreme_tile(jnp.full((C, 4), -1.876)))
    assert bool(chunk_math.is_extreme_tile(jnp.zeros((C, 4)).at[3, 1].set(-3.0e38)))
    rng = np.random.default_rng(7)
    for _ in range(200):
        g = -rng.exponential(rng.uniform(0.5, 3.5), size=(C, 8)).astype(np.float32)
        flag = bool(chunk_math.is_extreme_tile(jnp.asarray(g)))
        assert flag == bool(chunk_math.is_extreme_tile(jnp.asarray(g[rng.permutation(C)])))
        total = (-g.astype(np.float64).sum(axis=0)).max()
        if abs(total - chunk_math.MAX_CHUNK_DECAY) > C / 1024:
            masks = common.chunk_masks(jnp.zeros(C, jnp.int32), slice(None), jnp.int32(0),
                                       common.causal_mask(C))
            gt = chunk_math.gates(jnp.asarray(g), masks)
            assert flag == bool(chunk_math.is_extreme(gt)) == (total > 120.0), total


def test_sub_chunk_must_divide_the_chunk():
    """A sub-chunk size that does not divide the chunk size is refused when the kernels are
    built, naming both."""
    case, seed = "segments_C32", 321
    args, cot, seg, (C, state, segs) = _case_inputs(seed, case, jnp.float32)
    with pgla.tuning(sub_chunk=12):
        with pytest.raises(ValueError, match=r"sub_chunk \(12\) must divide the chunk size \(32\)"):
            gated_slot_attention(*args[:5], impl="pallas", chunk_size=C)


def _forward(args, seg, impl, C):
    """(o, (Hk, Hv)) of GSA on a case's inputs, from its initial state."""
    return gated_slot_attention(*args[:5], initial_state=args[5:], return_final_state=True,
                                segment_ids=seg, impl=impl, chunk_size=C)


def _float64_forward(seed, case, prep):
    """The float64 recurrence's (o, (Hk, Hv)) on a case's inputs changed by prep, as numpy."""
    with enable_x64():
        args, _, seg, _ = _case_inputs(seed, case, jnp.float64)
        return jax.tree.map(np.asarray, _forward(prep(args), seg, "recurrent", CASES[case][7]))


def test_fixup_forward_with_strong_gates():
    """The one-walk split forward (`split_fixup`) with g ≈ -3 per step, packed segments and an
    initial state: a chunk of 32 decays by ~e^-96 (its inverse would overflow float32), the
    decay from a big chunk's start underflows to 0 within it, while the first few positions
    of each big chunk still get a fix-up that matters; outputs and final states match the
    float64 recurrence on the same inputs."""
    case, seed = "segments_C32", 310
    C = CASES[case][7]

    def strong(args):
        q, k, v, s, g, hk0, hv0 = args
        return (q, k, v, s, g * 0 - 3.0 + 0.5 * jnp.tanh(g), hk0, hv0)

    ref = _float64_forward(seed, case, strong)
    args, _, seg, _ = _case_inputs(seed, case, jnp.float32)
    with pgla.tuning(split_below_programs=10 ** 6, split_programs=10 ** 6,
                     split_min_chunks=1, fused_max_chunks=1, split_fixup=True):
        o, (hk, hv) = jax.jit(lambda a, sg: _forward(a, sg, "pallas", C))(strong(args), seg)
    _assert_rel(o, ref[0], F32_REL, "o")
    _assert_rel(hk, ref[1][0], F32_REL, "final Hk")
    _assert_rel(hv, ref[1][1], F32_REL, "final Hv")


def _mixed_gates(args):
    """Gates of one tile of each kind at chunk 32 (segments_C32's 3 chunks): the original ones
    in chunk 0 (the fast path), ~-5 per step in chunk 1 (past the chunk bound, sub-chunks of 8
    within it: the sub-chunk tier), ~-20 in chunk 2 (sub-chunks past it too: the exact loop)."""
    q, k, v, s, g, hk0, hv0 = args
    t = jnp.arange(q.shape[1])[None, :, None, None]
    per_step = jnp.where(t < 64, -5.0, -20.0) + 0.5 * jnp.tanh(g)
    return (q, k, v, s, jnp.where(t < 32, g, per_step), hk0, hv0)


@pytest.mark.parametrize("path,tuning", [
    ("walk", {}),
    ("big_chunks", dict(split_below_programs=10 ** 6, split_programs=10 ** 6,
                        split_min_chunks=1)),
    # the combine in the kernels: its decays multiply tiles past the bound (e^-160 over a
    # chunk of -5 per step: 0 in float32) and the fold must carry them
    ("big_chunks_in_kernel", dict(split_below_programs=10 ** 6, split_programs=10 ** 6,
                                  split_min_chunks=1, split_combine_in_kernel=True)),
    ("output_kernel", dict(fused_forward=False)),
])
def test_strong_gates_apart_forward_matches_float64(path, tuning):
    """`strong_gates_apart`: the forward's walk (or output kernel) takes the fast path only and
    `gla_strong_intra_fwd` adds the terms of the tiles past the bound (the sub-chunk tier and
    the exact loop) in place; with one tile of each kind, packed segments and an initial
    state, outputs and final states match the float64 recurrence, through the plain fused
    walk, the walk over big chunks and the states + output kernels."""
    case, seed = "segments_C32", 330
    C = CASES[case][7]

    ref = _float64_forward(seed, case, _mixed_gates)
    args, _, seg, _ = _case_inputs(seed, case, jnp.float32)
    with pgla.tuning(strong_gates_apart=True, sub_chunk=8, **tuning):
        fn = jax.jit(lambda a, sg: _forward(a, sg, "pallas", C))
        jaxpr = str(jax.make_jaxpr(fn)(_mixed_gates(args), seg))
        o, (hk, hv) = fn(_mixed_gates(args), seg)
    assert jaxpr.count("name=gla_strong_intra_fwd") == 2, "one per GSA pass"
    _assert_rel(o, ref[0], F32_REL, "o")
    _assert_rel(hk, ref[1][0], F32_REL, "final Hk")
    _assert_rel(hv, ref[1][1], F32_REL, "final Hv")


def _tuned_against_float64(seed, case, prep, recompute=False, **tuning):
    """The kernels under a tuning on a case's inputs (transformed by prep), values and every
    gradient compared with the float64 recurrence on the same inputs (recompute: the
    backward recomputes the chunk states); returns the jaxpr's text (which kernels ran)."""
    C, segs, state = CASES[case][7:10]
    with enable_x64():
        args, cot, seg, _ = _case_inputs(seed, case, jnp.float64)
        ref_out, ref_grads = jax.tree.map(
            np.asarray, _value_and_grads("recurrent", C, state, segs)(prep(args), cot, seg))
    args, cot, seg, _ = _case_inputs(seed, case, jnp.float32)
    with pgla.tuning(**tuning):
        fn = _value_and_grads.__wrapped__("pallas", C, state, segs, recompute)
        jaxpr = str(jax.make_jaxpr(fn)(prep(args), cot, seg))
        out, grads = fn(prep(args), cot, seg)
    _compare(out, grads, ref_out, ref_grads, F32_REL, state)
    return jaxpr


@pytest.mark.parametrize("tuning", [
    {},
    _slow(dict(block_v_bwd=8)),                                  # value blocks: partial sums
    _slow(dict(block_k_bwd=8, block_v_bwd=8)),                   # key blocks as programs
    pytest.param(dict(block_k_bwd=8, key_loop_bwd=True), marks=pytest.mark.slow),
    dict(strong_gates_apart="value"),                            # pass 1 only
    # key blocks of 8 looped, only slots 0-7 strong: a key block within the bound inside a
    # tile past it (the loop's fast path and the strong kernel must split the tile alike)
    dict(block_k_bwd=8, key_loop_bwd=True, half_slots=True),
    _slow(dict(block_k_bwd=8, half_slots=True)),                 # as programs: per block
], ids=["whole", "value_blocks", "key_blocks", "key_loop", "value_pass_only",
        "key_loop_half_slots", "key_blocks_half_slots"])
def test_strong_gates_apart_gradients_match_float64(tuning):
    """`strong_gates_apart` in the backward: the gradient kernel takes the fast path only and
    `gla_strong_intra_bwd` adds the within-chunk gradient terms of the tiles past the bound
    (dq, dk, dv, dg in place), in every layout of the gradient kernel, for both GSA passes or
    ("value") the value-gated one only; with one tile of each kind (fast, sub-chunk tier,
    exact loop), packed segments and an initial state, values and every gradient match the
    float64 recurrence."""
    case, seed = "segments_C32", 331
    C = CASES[case][7]
    tuning = {"strong_gates_apart": True, **tuning}
    prep = _mixed_gates
    if tuning.pop("half_slots", False):
        def prep(args):
            mixed = _mixed_gates(args)
            slots = jnp.arange(args[4].shape[-1])
            return (*mixed[:4], jnp.where(slots < 8, mixed[4], args[4]), *mixed[5:])
    jaxpr = _tuned_against_float64(seed, case, prep, sub_chunk=8, **tuning)
    passes = 2 if tuning["strong_gates_apart"] is True else 1
    # the forward (states + output kernel) and the backward each hold one per pass apart
    assert jaxpr.count("name=gla_strong_intra_bwd") == jaxpr.count(
        "name=gla_strong_intra_fwd") == passes


@pytest.mark.parametrize("case,tuning", [
    ("segments_C32", dict(split_grads_bwd=True)),
    _slow("segments_C32", dict(split_grads_bwd="value", block_v_bwd=8)),   # value blocks
    _slow("segments_C32", dict(split_grads_bwd="key", block_k_bwd=8, key_loop_bwd=False)),
    # a key loop asked for: the split takes the whole K instead
    _slow("segments_C32", dict(split_grads_bwd=True, block_k_bwd=8, key_loop_bwd=True)),
    ("K32_V16_M32_gqa", dict(split_grads_bwd=True)),                   # mild gates, no segments
], ids=["both_passes", "value_pass_value_blocks", "key_pass_key_blocks", "over_key_loop",
        "mild_gates"])
def test_split_gradient_kernels_match_float64(case, tuning):
    """`split_grads_bwd`: the gradient kernel as two, the query side (dq, db_q through memory)
    then the key/value side (dk, dv, dg), fast path only, with the strong kernel adding the
    tiles past the bound; with one tile of each kind (segments_C32: fast, sub-chunk tier,
    exact loop; packed segments, an initial state, grouped heads), value and key blocks, and
    mild gates without segments (K32_V16_M32_gqa), values and every gradient match the
    float64 recurrence."""
    prep = _mixed_gates if case == "segments_C32" else (lambda a: a)
    # strong tiles apart off where not implied (the default takes them on pass 1 here)
    jaxpr = _tuned_against_float64(332, case, prep, sub_chunk=8, strong_gates_apart=False,
                                   **tuning)
    passes = 2 if tuning["split_grads_bwd"] is True else 1
    assert jaxpr.count("name=gla_grads_query_bwd") == passes
    assert jaxpr.count("name=gla_grads_key_value_bwd") == passes
    assert jaxpr.count("name=gla_grads_bwd") == 2 - passes
    assert jaxpr.count("name=gla_strong_intra_bwd") == passes   # implied by the split


SPLIT_EVERYWHERE = dict(split_below_programs=10 ** 6, split_programs=10 ** 6, split_min_chunks=1)


def _grids(jaxpr: str, name: str) -> list[tuple]:
    """The grids of the launches of kernel `name` in a jaxpr's text."""
    grids = []
    for call in jaxpr.split("pallas_call[")[1:]:   # each launch's parameters: grid, then name
        grid, kernel = re.search(r"grid=\(([0-9, ]+)\)", call), re.search(r"name=(\w+)", call)
        if kernel.group(1) == name:
            grids.append(tuple(int(x) for x in grid.group(1).split(",")))
    return grids


@pytest.mark.parametrize("tuning,programs", [
    (dict(chunks_per_program_fwd=3, chunks_per_program_bwd=3), (1, 1)),
    # 4 asked of 3 chunks: 3 taken; 2 asked: 1 (the largest divisor); both passes apart
    _slow(dict(chunks_per_program_fwd=2, chunks_per_program_bwd=4, strong_gates_apart=True),
          (3, 1)),
    (dict(chunks_per_program_bwd=3, block_k_bwd=8, key_loop_bwd=True), (3, 1)),   # key loop
    # key blocks as programs (and the split kernels) keep one chunk per program
    _slow(dict(chunks_per_program_bwd=3, block_k_bwd=8, key_loop_bwd=False), (3, 3)),
    _slow(dict(chunks_per_program_bwd=3, split_grads_bwd=True), (3, None)),
    # split state walks (big chunks): the chunk states they write, read 3 to a program
    _slow(dict(SPLIT_EVERYWHERE, chunks_per_program_fwd=3, chunks_per_program_bwd=3), (1, 1)),
], ids=["both", "fwd2_bwd4_apart", "key_loop", "key_blocks", "split", "big_chunks"])
def test_chunks_per_program_match_float64(tuning, programs):
    """`chunks_per_program_fwd` / `_bwd`: programs of the output and gradient kernels walk
    several chunks each, reading each chunk's state at its own rows of the program's block;
    with one tile of each kind (fast, sub-chunk tier, exact loop), packed segments, an
    initial state and a key loop, values and every gradient match the float64 recurrence
    (segments_C32 has 3 chunks: a program that read its first chunk's state for all three
    would fail), and the grids have N / P programs along time."""
    jaxpr = _tuned_against_float64(333, "segments_C32", _mixed_gates, sub_chunk=8, **tuning)
    out_programs, grads_programs = programs
    assert {grid[0] for grid in _grids(jaxpr, "gla_output_fwd")} == {out_programs}
    if grads_programs is None:
        assert _grids(jaxpr, "gla_grads_bwd") == []
    else:
        assert {grid[0] for grid in _grids(jaxpr, "gla_grads_bwd")} == {grads_programs}
    # the strong kernels keep one chunk per program
    assert {grid[0] for grid in _grids(jaxpr, "gla_strong_intra_bwd")} <= {3}
    if "split_programs" in tuning:   # the big chunks' walks ran
        assert "name=gla_final_state_fwd" in jaxpr


@pytest.mark.parametrize("tuning", [
    {},
    _slow(dict(strong_gates_apart=True)),           # the strong kernel adds its own db terms
    _slow(dict(block_v_bwd=8)),                     # value blocks: partial sums of db
    _slow(dict(block_k_bwd=8, key_loop_bwd=True)),  # key blocks looped: db per block
    _slow(dict(split_grads_bwd=True)),              # query side q ⊙ dq, key side −k ⊙ dk
], ids=["whole", "apart", "value_blocks", "key_loop", "split"])
def test_key_gate_grad_identity_matches_float64(tuning):
    """`key_gate_grad_identity`: the key-gated pass's gate gradient from the finished dq and
    dk (db = q ⊙ dq − k ⊙ dk plus the last row's terms) instead of term by term; with one
    tile of each kind (fast, sub-chunk tier, exact loop), packed segments and an initial
    state, values and every gradient (the gates' through both passes) match the float64
    recurrence in every layout of the gradient kernel. The launch keywords carry it to the
    key-gated pass's gradient kernel only."""
    _tuned_against_float64(337, "segments_C32", _mixed_gates, sub_chunk=8,
                           key_gate_grad_identity=True, **tuning)
    with pgla.tuning(key_gate_grad_identity=True):
        tuning = pgla.resolved_tuning(jnp.bfloat16, 64, 128, key_gated=True)
    for key_gated in (True, False):
        config = _launch_config(tuning, key_gated)
        assert config.kw(parallel=True, backward=True).get("identity", False) == key_gated
        assert "identity" not in config.kw(parallel=True)


def test_chunks_per_program_values_are_checked():
    """Chunks per program take a positive integer (also from $GSA_PALLAS_TUNING), and a layout
    refuses a count that does not divide its chunks or comes with key blocks as programs."""
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match="chunks_per_program_bwd must be a positive"):
            pgla.Tuning(chunks_per_program_bwd=bad)
    lay = dict(B=1, Tp=96, H=2, Hkv=2, K=16, V=16, C=32, BV=16, key_gated=True,
               parallel=True)
    assert pcommon.Layout(**lay, P=3).grid == (1, 2, 1)
    with pytest.raises(ValueError, match="divide"):
        pcommon.Layout(**lay, P=2)
    with pytest.raises(ValueError, match="whole K"):
        pcommon.Layout(**{**lay, "BK": 8}, P=3)
    assert pcommon.chunks_per_program(2, pcommon.Layout(**lay)) == 1
    assert pcommon.chunks_per_program(8, pcommon.Layout(**lay)) == 3
    # the launch keywords: each kernel its own count; a looped launch pipelines 2 stages deep
    with pgla.tuning(chunks_per_program_bwd=4):
        tuning = pgla.resolved_tuning(jnp.bfloat16, 128, 64, key_gated=False)
    config = _launch_config(tuning, False)
    grads, out = config.kw(parallel=True, backward=True), config.kw(parallel=True)
    assert (grads["chunks"], grads["num_stages"]) == (4, 2)
    assert (out["chunks"], out["num_stages"]) == (1, tuning.stages) and tuning.stages == 3
    assert "chunks" not in config.kw(parallel=False)   # the walks take every chunk anyway


@pytest.mark.parametrize("tuning", [
    {},
    dict(strong_gates_apart=True),                  # the strong kernel reads b's last row
    _slow(SPLIT_EVERYWHERE),                        # big chunks: the combine in the kernels
    _slow(dict(block_v=8)),                         # value blocks (value gate: b's slice)
    _slow(dict(SPLIT_EVERYWHERE, split_fixup=True)),   # not taken: it sums g in XLA
], ids=["fused_walk", "apart", "big_chunks", "value_blocks", "fixup_asked"])
def test_cumulative_gates_forward_matches_float64(tuning):
    """`cumulative_gates`: the forward's kernels read b, the log gates summed inside each
    chunk once in XLA, and b's last row instead of summing g themselves; with one tile of each
    kind (fast, sub-chunk tier, exact loop), packed segments and an initial state, the fused
    walk's outputs and final states match the float64 recurrence, also with the strong tiles'
    kernel apart, over big chunks and in value blocks; one chunk cumsum runs in XLA for
    both GSA passes (gsa_pallas sums g once), none without the tuning (dropping it, so that
    the kernels read g as if it were b, fails the values)."""
    case, seed = "segments_C32", 340
    C = CASES[case][7]
    ref = _float64_forward(seed, case, _mixed_gates)
    args, _, seg, _ = _case_inputs(seed, case, jnp.float32)
    with pgla.tuning(cumulative_gates=True, sub_chunk=8, **tuning):
        o, (hk, hv) = jax.jit(lambda a, sg: _forward(a, sg, "pallas", C))(_mixed_gates(args), seg)
    _assert_rel(o, ref[0], F32_REL, "o")
    _assert_rel(hk, ref[1][0], F32_REL, "final Hk")
    _assert_rel(hv, ref[1][1], F32_REL, "final Hv")
    plain = {**tuning, "split_fixup": False}   # the path taken (the fix-up sums g in XLA)
    assert _xla_arithmetic(C, args, seg, cumulative_gates=True, **tuning)["cumsum"] == \
        _xla_arithmetic(C, args, seg, **plain)["cumsum"] + 1


@pytest.mark.parametrize("tuning", [
    {},
    _slow(SPLIT_EVERYWHERE),                               # both state walks, big chunks
    _slow(dict(strong_gates_apart=True, block_v_bwd=8)),   # strong kernels, value blocks
    _slow(dict(block_k_bwd=8, key_loop_bwd=True)),         # key blocks looped (per-block b)
    _slow(dict(block_k_bwd=8, key_loop_bwd=False, strong_gates_apart=True)),   # as programs
    dict(split_grads_bwd=True),                            # the two gradient kernels
    _slow(dict(case="wide_K512_V384_M256")),               # pass 1 in key slices
    _slow(dict(SPLIT_EVERYWHERE, recompute=True)),         # the backward's state walks
], ids=["walks", "big_chunks", "apart_value_blocks", "key_loop", "key_blocks", "split_grads",
        "wide", "recompute_big_chunks"])
def test_cumulative_gates_forward_backward_matches_float64(tuning):
    """`cumulative_gates` through forward and backward: the forward's state walk and output
    kernel, the backward's state-gradient walk and gradient kernels all read b (the backward
    sums g again), also over big chunks (both combines in the kernels), with the strong tiles
    apart, in value blocks, key blocks looped or as programs, and the split gradient kernels:
    values and every gradient (dg still of the log gates) match the float64 recurrence on
    mixed gates, packed segments and an initial state."""
    case = tuning.pop("case", "segments_C32")
    _tuned_against_float64(341, case, _mixed_gates if case == "segments_C32" else (lambda a: a),
                           sub_chunk=8, cumulative_gates=True, **tuning)


@pytest.mark.parametrize("gate_axis", ["key", "value"])
def test_cumulative_gates_in_gla_match_float64(gate_axis):
    """`cumulative_gates` for plain GLA (gla_chunk_pallas sums the gates itself, outside its
    custom_vjp, and autodiff turns b's gradient into the log gates'): T = 75 (a partial last
    chunk: b padded with its last value), gates of ~-4.2 per step (most chunks of 32 past the
    bound, sub-chunks of 8 within it), an initial state; outputs, final state and the
    gradients of q, k, v, g and the initial state against the float64 recurrence."""
    from gsa_jax.ops import gated_linear_attention
    B, T, H, K, V, C = 1, 75, 2, 16, 32, 32
    keys = jax.random.split(jax.random.PRNGKey(350), 6)
    D = K if gate_axis == "key" else V
    with enable_x64():
        q, k = (jax.random.normal(keys[i], (B, T, H, K), jnp.float64) for i in (0, 1))
        v = jax.random.normal(keys[2], (B, T, H, V), jnp.float64)
        g = -4.2 + jnp.tanh(jax.random.normal(keys[3], (B, T, H, D), jnp.float64))
        s0 = jax.random.normal(keys[4], (B, H, K, V), jnp.float64)
        cot = jax.random.normal(keys[5], (B, T, H, V), jnp.float64)

        def loss(impl):
            def f(q, k, v, g, s0):
                o, sT = gated_linear_attention(q, k, v, g, gate_axis=gate_axis,
                                               initial_state=s0, return_final_state=True,
                                               impl=impl, chunk_size=C)
                return jnp.sum(o * cot.astype(o.dtype)) + jnp.sum(sT ** 2), (o, sT)
            return jax.value_and_grad(f, argnums=range(5), has_aux=True)

        (_, ref_out), ref_grads = jax.tree.map(np.asarray, loss("recurrent")(q, k, v, g, s0))
    args32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v, g, s0)]
    with pgla.tuning(cumulative_gates=True, sub_chunk=8):
        (_, out), grads = jax.jit(loss("pallas"))(*args32)
    for name, got, want in zip(("o", "final state"), out, ref_out):
        _assert_rel(got, want, F32_REL, name)
    for name, got, want in zip(("dq", "dk", "dv", "dg", "ds0"), grads, ref_grads):
        _assert_rel(got, want, F32_REL, name)


def test_bfloat16_inputs_close_to_float64():
    """bf16 inputs (f32 accumulation inside): output in bf16, within bf16 rounding of the
    float64 reference computed on the same (rounded) inputs."""
    case = "K32_V16_M32_gqa"
    seed = 400
    args, cot, seg, (C, state, segs) = _case_inputs(seed, case, jnp.bfloat16)
    o, _ = jax.jit(lambda *a: gated_slot_attention(
        *a[:5], initial_state=(a[5], a[6]), impl="pallas", chunk_size=C))(*args)
    assert o.dtype == jnp.bfloat16
    with enable_x64():
        ref = gated_slot_attention(*(jnp.asarray(a, jnp.float64) for a in args[:5]),
                                   initial_state=tuple(jnp.asarray(a, jnp.float64)
                                                       for a in args[5:]), impl="recurrent")[0]
        ref = np.asarray(ref)
    _assert_rel(o, ref, 2e-2, "bf16 o")


def test_tuning_from_the_environment(monkeypatch):
    """$GSA_PALLAS_TUNING (a JSON object) changes the default launch; unknown keys are refused
    with the list of known ones."""
    monkeypatch.setenv("GSA_PALLAS_TUNING", '{"stages": 1, "block_v": 32}')
    tuning = pgla._tuning_from_env()
    assert (tuning.stages, tuning.block_v) == (1, 32)
    assert tuning.warps_par == pgla.Tuning().warps_par   # the rest stays the default
    monkeypatch.setenv("GSA_PALLAS_TUNING", "")
    assert pgla._tuning_from_env() == pgla.Tuning()
    monkeypatch.setenv("GSA_PALLAS_TUNING", '{"block": 32}')
    with pytest.raises(ValueError, match="block_v_bwd"):
        pgla._tuning_from_env()


def test_strong_gates_apart_values_are_checked():
    """`strong_gates_apart` takes true, false, "key" or "value"; anything else is refused with
    the accepted values (also from $GSA_PALLAS_TUNING)."""
    assert pgla.Tuning(strong_gates_apart="key").strong_gates_apart == "key"
    with pytest.raises(ValueError, match="'key' or 'value', got 'keys'"):
        pgla.Tuning(strong_gates_apart="keys")
    with pytest.raises(ValueError, match="strong_gates_apart"):
        pgla.set_tuning(strong_gates_apart="both")
    assert pgla.current_tuning() == pgla.Tuning()   # refused: nothing changed


def _launch_config(tuning, key_gated):
    """The static settings of one compiled launch of a resolved tuning (for its kw)."""
    return pgla.KernelConfig(key_gated=key_gated, scale=1.0, chunk_size=64,
                             recompute_states=False, out_dtype=None, interpret=False,
                             tuning=tuning)


def test_large_state_automatic_choices():
    """`block_k_bwd=None` / `warps_states=None` (auto): key blocks of 64 looped inside each
    program for a key-gated pass with a state of at least 128 x 128 only (the value-gated
    pass, a smaller state and an explicit setting keep theirs), 8 warps for the forward state
    walk of a large state; the launch keywords the kernels get follow. The defaults (0) keep
    the whole K and `warps_seq` until the GPU has timed the automatic choice."""
    bf16 = jnp.bfloat16
    with pgla.tuning(block_k_bwd=None, warps_states=None, split_grads_bwd=False):
        big_key = pgla.resolved_tuning(bf16, 128, 128, key_gated=True)
        big_value = pgla.resolved_tuning(bf16, 128, 128, key_gated=False)
        small_key = pgla.resolved_tuning(bf16, 64, 128, key_gated=True)
        wide_key = pgla.resolved_tuning(bf16, 256, 128, key_gated=True)
    assert (big_key.block_k_bwd, big_key.key_loop_bwd) == (pgla.LARGE_STATE_BWD_BLOCK_K, True)
    assert (wide_key.block_k_bwd, wide_key.key_loop_bwd) == (pgla.LARGE_STATE_BWD_BLOCK_K, True)
    assert (big_value.block_k_bwd, small_key.block_k_bwd) == (0, 0)
    assert big_key.warps_states == big_value.warps_states == pgla.LARGE_STATE_WARPS_STATES
    assert small_key.warps_states == small_key.warps_seq
    with pgla.tuning(block_k_bwd=32, warps_states=2):   # explicit: programs, as asked
        explicit = pgla.resolved_tuning(bf16, 128, 128, key_gated=True)
    assert (explicit.block_k_bwd, explicit.key_loop_bwd, explicit.warps_states) == (32, False, 2)
    default = pgla.resolved_tuning(bf16, 128, 128, key_gated=True)
    assert (default.block_k_bwd, default.warps_states) == (0, default.warps_seq)

    config = _launch_config
    grads_kw = config(big_key, True).kw(parallel=True, backward=True)
    assert (grads_kw["block_k"], grads_kw["key_loop"]) == (64, True)
    assert "block_k" not in config(big_value, False).kw(parallel=True, backward=True)
    assert config(big_key, True).kw(parallel=False)["num_warps"] == 8        # state walk
    assert config(big_key, True).kw(parallel=False, backward=True)["num_warps"] == \
        big_key.warps_seq                                                     # its gradient


def test_launch_variants_automatic_choices():
    """The defaults (None, auto) of `strong_gates_apart` and `split_grads_bwd`, as timed on an
    H100 (Tuning): strong tiles apart for a value-gated pass with K <= 128 and V < 128 only
    (GSA's first pass at M <= 64; not at K = 256, where the strong kernels overflow shared
    memory), the gradient kernel split for a key-gated pass with K = 128, V >= 128 only
    (GSA's second pass at M = 128), each launch's keywords following; an explicit setting
    wins. The in-kernel combine is on."""
    bf16 = jnp.bfloat16
    assert pgla.Tuning().split_combine_in_kernel

    def resolved(K, V, key_gated, **changes):
        with pgla.tuning(**changes):
            return pgla.resolved_tuning(bf16, K, V, key_gated=key_gated)

    def kw(tuning, key_gated, **where):
        return _launch_config(tuning, key_gated).kw(parallel=True, **where)

    apart = {(K, V, kg): resolved(K, V, kg).strong_gates_apart
             for K, V, kg in [(128, 64, False), (128, 32, False), (128, 128, False),
                              (256, 64, False), (256, 32, False), (128, 64, True),
                              (64, 64, True)]}
    assert apart == {(128, 64, False): True, (128, 32, False): True, (128, 128, False): False,
                     (256, 64, False): False, (256, 32, False): False, (128, 64, True): False,
                     (64, 64, True): False}
    split = {(K, V, kg): resolved(K, V, kg).split_grads_bwd
             for K, V, kg in [(128, 128, True), (256, 128, True), (128, 128, False),
                              (64, 128, True), (128, 64, True)]}
    assert split == {(128, 128, True): True, (256, 128, True): False, (128, 128, False): False,
                     (64, 128, True): False, (128, 64, True): False}
    assert kw(resolved(128, 64, False), False)["strong_apart"]
    assert "strong_apart" not in kw(resolved(128, 128, False), False)
    assert kw(resolved(128, 128, True), True, backward=True)["split"]
    assert "split" not in kw(resolved(128, 64, True), True, backward=True)
    # with the key loop asked for, the split still replaces it
    looped = resolved(128, 128, True, block_k_bwd=None)
    assert "block_k" not in kw(looped, True, backward=True)
    assert resolved(128, 64, False, strong_gates_apart=False).strong_gates_apart is False
    assert resolved(128, 128, True, split_grads_bwd="value").split_grads_bwd == "value"
    assert "split" not in kw(resolved(128, 128, True, split_grads_bwd="value"), True,
                             backward=True)


@pytest.mark.parametrize("key_gated", [True, False], ids=["key_gate", "value_gate"])
def test_kernels_lower_to_triton_with_the_sub_chunk_tier(key_gated):
    """The compiled (not interpreted) GPU kernels, forward and backward at chunk 64 with the
    default sub-chunk tier (16) and with it off, lower to Triton IR on this CPU machine
    (jax.export for "cuda" runs Pallas' Triton lowering, which refuses primitives and shapes
    Triton lacks); the tier adds to the kernels that compute intra-chunk terms (the fused
    forward and the backward's gradient kernel), not to the state walks. Triton's own
    compilation and the numbers are the GPU's to check (bench_gate_strength --check)."""
    import re

    sd = jax.ShapeDtypeStruct
    B, T, H, K, V = 1, 256, 2, 64, 32
    D = K if key_gated else V
    args = (sd((B, T, H, K), jnp.bfloat16), sd((B, T, H, K), jnp.bfloat16),
            sd((B, T, H, V), jnp.bfloat16), sd((B, T, H, D), jnp.bfloat16),
            sd((B, H, K, V), jnp.float32))
    triton = "__gpu$xla.gpu.triton"

    def kernel_sizes(sub_chunk):
        def loss(q, k, v, g, s0):
            o, sT = pgla.gla_chunk_pallas(q, k, v, g, s0, None, key_gated=key_gated, scale=0.1,
                                          chunk_size=64, interpret=False)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(sT)

        def fwd(*a):
            return loss(*a)

        sizes = {}
        # the tier inside the hot kernels (the default takes a small value-gated pass's
        # strong tiles apart, into kernels of their own)
        with pgla.tuning(sub_chunk=sub_chunk, strong_gates_apart=False):
            for fn in (jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))):
                module = jax.export.export(
                    fn, platforms=["cuda"],
                    disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)],
                )(*args).mlir_module()
                for call in module.split(triton)[1:]:
                    ir = re.search(r'ir = "(.*?)", name = "(\w+)"', call)
                    sizes[ir.group(2)] = len(ir.group(1))
        return sizes

    off, on = kernel_sizes(0), kernel_sizes(None)
    assert set(on) == set(off) == {"gla_fused_fwd", "gla_states_fwd", "gla_grads_bwd",
                                   "gla_dstates_bwd"}, sorted(on)
    grew = {name for name in on if on[name] > off[name]}
    assert grew == {"gla_fused_fwd", "gla_grads_bwd"}, (off, on)


@pytest.mark.parametrize("key_loop", [False, True], ids=["grid", "loop"])
@pytest.mark.parametrize("gates", ["mild", pytest.param("sharp", marks=pytest.mark.slow)])
def test_backward_key_blocks_match_float64(gates, key_loop):
    """`block_k_bwd`: the chunk-parallel gradient kernel in key blocks (8 of K = M = 16, with
    value blocks of 8), as programs of their own (grid: a (chunk, head) has 4 programs, the
    grid's last axis NV·NK) or one after another in each program (`key_loop_bwd`: 2 programs);
    packed segments, an initial state; with mild gates (the fast path) and sharp ones (chunk
    32, sub-chunk tier 8, then the exact loop: every intra-chunk path in key blocks). Values and
    gradients against the float64 recurrence."""
    import re
    case, seed = "segments_C32", 440
    C = CASES[case][7]
    prep = _sharp_gates if gates == "sharp" else (lambda a: a)
    with enable_x64():
        args, cot, seg, _ = _case_inputs(seed, case, jnp.float64)
        ref_out, ref_grads = jax.tree.map(
            np.asarray, _value_and_grads("recurrent", C, True, True)(prep(args), cot, seg))
    args, cot, seg, _ = _case_inputs(seed, case, jnp.float32)
    with pgla.tuning(block_k_bwd=8, block_v_bwd=8, sub_chunk=8, key_loop_bwd=key_loop):
        fn = _value_and_grads.__wrapped__("pallas", C, True, True)
        jaxpr = str(jax.make_jaxpr(fn)(prep(args), cot, seg))
        out, grads = fn(prep(args), cot, seg)
    calls = [call for call in jaxpr.split("pallas_call[")[1:] if "name=gla_grads_bwd" in call]
    grids = [re.search(r"grid=\((\d+), (\d+), (\d+)\)", call).groups() for call in calls]
    assert len(grids) == 2 and all(g[2] == ("2" if key_loop else "4") for g in grids), grids
    _compare(out, grads, ref_out, ref_grads, F32_REL, True)

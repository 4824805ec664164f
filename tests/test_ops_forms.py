"""Values of every form in float64 against the NumPy reference, and the op's structural properties:
T = 1, T not a multiple of the chunk, chunk sizes, grouped heads, slot activations, the GLA
primitive on both gate axes, packed segments, split-and-carry and the one-step decode."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from ops_util import (FORMS, SLOT_ACTIVATIONS, assert_close, gla_fn, gla_inputs, gsa_fn,
                      gsa_inputs, step_fn)
from reference import gla_reference, gsa_reference

from gsa_jax.ops import gated_linear_attention_step

pytestmark = pytest.mark.usefixtures("x64")

TOL = dict(rtol=1e-10, atol=1e-10)  # float64 forms agree to ~1e-14; this leaves headroom

# name: (B, T, H, Hkv, K, V, M, with initial state)
CASES = {
    "T1": (2, 1, 2, 2, 4, 3, 5, True),
    "ragged_gqa": (2, 37, 4, 2, 4, 3, 5, True),  # 37 = 2 chunks of 16 + 5; H = 2 · Hkv
    "zero_state": (1, 20, 2, 2, 3, 4, 6, False),
}


def _check_against_reference(out, ref):
    (o, (hk, hv)), (o_ref, (hk_ref, hv_ref)) = out, ref
    assert o.dtype == np.float64 and hk.dtype == np.float64 and hv.dtype == np.float64
    assert_close(o, o_ref, **TOL, what="o")
    assert_close(hk, hk_ref, **TOL, what="final Hk")
    assert_close(hv, hv_ref, **TOL, what="final Hv")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", FORMS)
def test_gsa_matches_reference(impl, case):
    B, T, H, Hkv, K, V, M, state = CASES[case]
    x = gsa_inputs(1, B, T, H, Hkv, K, V, M, state=state)
    out = gsa_fn(impl, chunk_size=16)(*x[:5], x.state)
    _check_against_reference(out, gsa_reference(*x[:5], initial_state=x.state))


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 16, 36, 64])
def test_chunk_sizes(chunk_size):
    """37 steps: no chunk size divides it but 1; 64 is a single, mostly padded chunk. The chunk
    form pads a chunk to a power of two (5 -> 8, 7 -> 8, 36 -> 64) and splits it into diagonal
    blocks of 8 steps and, level by level, blocks of 16, 32, 64 steps whose halves meet through
    a reference step: 16 takes one level, 36 and 64 three. Any positive chunk size is exact (5
    and 7 are sizes the Pallas kernels refuse)."""
    x = gsa_inputs(2, B=1, T=37, H=2, Hkv=1, K=4, V=3, M=5)
    out = gsa_fn("chunk", chunk_size=chunk_size)(*x[:5], x.state)
    _check_against_reference(out, gsa_reference(*x[:5], initial_state=x.state))


def test_auto_is_a_correct_form():
    x = gsa_inputs(3, B=1, T=37, H=2, Hkv=1, K=4, V=3, M=5)
    out = gsa_fn("auto", chunk_size=16)(*x[:5], x.state)
    _check_against_reference(out, gsa_reference(*x[:5], initial_state=x.state))


@pytest.mark.parametrize("slot_activation", SLOT_ACTIVATIONS)
@pytest.mark.parametrize("impl", FORMS)
def test_slot_activations(impl, slot_activation):
    x = gsa_inputs(4, B=1, T=19, H=2, Hkv=1, K=3, V=2, M=4)
    out = gsa_fn(impl, chunk_size=8, slot_activation=slot_activation)(*x[:5], x.state)
    ref = gsa_reference(*x[:5], initial_state=x.state, slot_activation=slot_activation)
    _check_against_reference(out, ref)


@pytest.mark.parametrize("gate_axis", ["key", "value"])
@pytest.mark.parametrize("impl", FORMS)
def test_gla_matches_reference(impl, gate_axis):
    """The primitive on its own, with grouped heads, an initial state and segments (T = 45:
    a full chunk of 32 in two sub-chunks, then a padded one; boundaries at 10 and 32)."""
    q, k, v, g, S0 = gla_inputs(5, B=2, T=45, H=4, Hkv=2, K=3, V=5, gate_axis=gate_axis)
    segment_ids = np.repeat(np.array([[0, 1, 2], [7, 7, 3]]), [10, 22, 13], axis=1)
    o, S = gla_fn(impl, gate_axis, chunk_size=32)(q, k, v, g, S0, segment_ids)
    o_ref, S_ref = gla_reference(q, k, v, g, gate_axis=gate_axis, initial_state=S0,
                                 segment_ids=segment_ids)
    assert_close(o, o_ref, **TOL, what="o")
    assert_close(S, S_ref, **TOL, what="final state")


# ---- packed segments, T = 40. With chunk size 8: row 0 has a boundary inside chunk 0 (at 5),
# one at a chunk start (16) which is also a one-token segment, then a boundary inside chunk 2
# (at 17). Row 1: ids need only differ from their neighbour: 3 comes back after 1 and is a new
# segment; the last segment is one token. With chunk size 32 (two sub-chunks of 16) the same
# boundaries fall inside a chunk, on and next to a sub-chunk boundary.
SEGMENT_CHUNKS = {"recurrent": [8], "parallel": [8], "chunk": [8, 32]}
SEGMENT_CASES = [(impl, C) for impl, sizes in SEGMENT_CHUNKS.items() for C in sizes]
SEGMENT_IDS = np.array([
    [0] * 5 + [1] * 11 + [2] + [3] * 23,
    [3] * 9 + [1] * 8 + [3] * 22 + [4],
])


def _segments(row: np.ndarray) -> list[tuple[int, int]]:
    starts = [0] + [t for t in range(1, len(row)) if row[t] != row[t - 1]]
    return list(zip(starts, starts[1:] + [len(row)]))


@pytest.mark.parametrize("impl,chunk_size", SEGMENT_CASES)
def test_packed_segments_match_reference(impl, chunk_size):
    B, T = SEGMENT_IDS.shape
    x = gsa_inputs(6, B, T, H=4, Hkv=2, K=3, V=4, M=5)
    out = gsa_fn(impl, chunk_size=chunk_size)(*x[:5], x.state, SEGMENT_IDS)
    ref = gsa_reference(*x[:5], initial_state=x.state, segment_ids=SEGMENT_IDS)
    _check_against_reference(out, ref)


@pytest.mark.parametrize("impl,chunk_size", SEGMENT_CASES)
def test_packed_segments_equal_separate_runs(impl, chunk_size):
    """Each segment run on its own (same form, no segment_ids) gives the packed outputs; only the
    first segment of a row sees the initial state; the final state is the last segment's.

    The separate runs share one call: row r of it holds one segment at its start, then filler
    steps with s = 0 and g = 0 — by causality they cannot change the outputs before them, and
    they leave the state as it was, so the row's final state is the segment's."""
    B, T = SEGMENT_IDS.shape
    x = gsa_inputs(7, B, T, H=4, Hkv=2, K=3, V=4, M=5)
    o, (hk, hv) = gsa_fn(impl, chunk_size=chunk_size)(*x[:5], x.state, SEGMENT_IDS)

    rows = [(b, start, end) for b in range(B) for start, end in _segments(SEGMENT_IDS[b])]
    sep = [np.zeros((len(rows),) + a.shape[1:]) for a in x[:5]]
    filler = gsa_inputs(8, len(rows), T, H=4, Hkv=2, K=3, V=4, M=5)
    hk0, hv0 = np.zeros((len(rows),) + x.hk0.shape[1:]), np.zeros((len(rows),) + x.hv0.shape[1:])
    for r, (b, start, end) in enumerate(rows):
        n = end - start
        for dst, src, fill in zip(sep, x[:5], filler[:5]):
            dst[r, :n] = src[b, start:end]
            dst[r, n:] = fill[r, : T - n]
        sep[3][r, n:] = 0.0  # s = 0: nothing written
        sep[4][r, n:] = 0.0  # g = 0: nothing forgotten
        if start == 0:
            hk0[r], hv0[r] = x.hk0[b], x.hv0[b]
    o_sep, (hk_sep, hv_sep) = gsa_fn(impl, chunk_size=chunk_size)(*sep, (hk0, hv0))

    for r, (b, start, end) in enumerate(rows):
        assert_close(o[b, start:end], o_sep[r, : end - start], **TOL,
                     what=f"row {b}, segment [{start}, {end})")
        if end == T:
            assert_close(hk[b], hk_sep[r], **TOL, what=f"final Hk of row {b}")
            assert_close(hv[b], hv_sep[r], **TOL, what=f"final Hv of row {b}")


@pytest.mark.parametrize("impl", FORMS)
def test_split_and_carry_equals_whole(impl):
    """Run [0, 13) and carry its final state into [13, 37): the outputs and the final state are
    those of the whole sequence (13 is not a chunk boundary for chunk size 16)."""
    x = gsa_inputs(9, *CASES["ragged_gqa"][:-1])
    fn = gsa_fn(impl, chunk_size=16)
    o, state = fn(*x[:5], x.state)
    o_a, state_a = fn(*(a[:, :13] for a in x[:5]), x.state)
    o_b, state_b = fn(*(a[:, 13:] for a in x[:5]), state_a)
    assert_close(np.concatenate([o_a, o_b], axis=1), o, **TOL, what="o")
    assert_close(state_b[0], state[0], **TOL, what="final Hk")
    assert_close(state_b[1], state[1], **TOL, what="final Hv")


@pytest.mark.parametrize("slot_activation", SLOT_ACTIVATIONS)
def test_step_repeated_equals_sequence(slot_activation):
    """The decode step applied T times, from an initial state, with grouped heads."""
    x = gsa_inputs(10, B=2, T=12, H=4, Hkv=2, K=3, V=4, M=5)
    o_ref, (hk_ref, hv_ref) = gsa_reference(*x[:5], initial_state=x.state,
                                            slot_activation=slot_activation)
    o_seq, _ = gsa_fn("recurrent", slot_activation=slot_activation)(*x[:5], x.state)
    step = step_fn(slot_activation)
    state, outs = x.state, []
    for t in range(x.q.shape[1]):
        o_t, state = step(*(a[:, t] for a in x[:5]), state)
        outs.append(o_t)
    o_steps = np.stack(outs, axis=1)
    assert o_steps.dtype == np.float64
    assert_close(o_steps, o_ref, **TOL, what="o vs reference")
    assert_close(o_steps, o_seq, **TOL, what="o vs recurrent sequence form")
    assert_close(state[0], hk_ref, **TOL, what="Hk")
    assert_close(state[1], hv_ref, **TOL, what="Hv")


@pytest.mark.parametrize("gate_axis", ["key", "value"])
def test_gla_step_repeated_equals_sequence(gate_axis):
    """The GLA decode step (the GLA and RetNet layers' decode) applied T times from an initial
    state, with grouped heads, against the reference and the recurrent sequence form."""
    q, k, v, g, S0 = gla_inputs(11, B=2, T=9, H=4, Hkv=2, K=3, V=5, gate_axis=gate_axis)
    o_ref, S_ref = gla_reference(q, k, v, g, gate_axis=gate_axis, initial_state=S0)
    o_seq, _ = gla_fn("recurrent", gate_axis)(q, k, v, g, S0)
    step = jax.jit(functools.partial(gated_linear_attention_step, gate_axis=gate_axis))
    state, outs = S0, []
    for t in range(q.shape[1]):
        o_t, state = step(q[:, t], k[:, t], v[:, t], g[:, t], state)
        outs.append(o_t)
    o_steps = np.stack(outs, axis=1)
    assert o_steps.dtype == np.float64 and state.shape == S0.shape
    assert_close(o_steps, o_ref, **TOL, what="o vs reference")
    assert_close(o_steps, o_seq, **TOL, what="o vs recurrent sequence form")
    assert_close(state, S_ref, **TOL, what="state")


@pytest.mark.parametrize("segments", [False, True])
def test_single_chunk_both_passes_in_one_jit(segments):
    """GSA's two passes jitted together with one chunk per sequence (T <= C) and several
    sequences: jaxlib 0.10's CPU YNN fusions miscompiled this program in 22 of 24 compiles
    (values of 1e+250, -inf) until gsa_jax turned them off on import (gsa_jax/_xla_cpu.py).
    Four distinct programs (chunk sizes, batch sizes), each a fresh compile."""
    for B, C in [(2, 32), (4, 32), (3, 64), (4, 64)]:
        x = gsa_inputs(40 + B + C, B=B, T=32, H=2, Hkv=2, K=16, V=16, M=64, state=False)
        seg = np.cumsum(np.random.default_rng(B).random((B, 32)) < 0.1, axis=1) if segments \
            else None
        out = gsa_fn("chunk", chunk_size=C)(*x[:5], None, seg)
        ref = gsa_reference(*x[:5], segment_ids=seg)
        _check_against_reference(out, ref)

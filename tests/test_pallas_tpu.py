"""The TPU (Mosaic) kernels, checked on the CPU.

- Numerics in TPU interpret mode (`pltpu.InterpretParams`: TPU memory and grid semantics
  simulated, uninitialised buffers NaN) against the float64 recurrent form: outputs, final
  states and the gradients of every input and both initial states, with grouped heads, packed
  segments, T not a multiple of the chunk, T = 1, gates strong enough for the exact in-kernel
  path and bf16 inputs. impl="pallas" reaches the TPU kernels through a faked TPU backend (the
  `tpu` fixture), the way a TPU run dispatches.
- The Pallas-to-Mosaic lowering (`jax.export` for platform "tpu"): every block obeys the TPU
  tiling and every primitive lowers. Mosaic's own compilation (in libtpu) and the speed on a
  TPU are not checked here.
- The block plan: the VMEM budget lists the kernels' actual blocks and stays under the smallest
  scoped VMEM of the current generations; the FLOPs per token of the roofline estimate are the
  matmuls of the traced kernels.

TPU interpret mode compiles slowly (several seconds per kernel), so the cases share compiled
functions and the heavier ones are marked slow. Case machinery: tests/test_pallas_kernels.py.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import test_pallas_kernels as kernel_tests
from gsa_jax import sharding as shd
from gsa_jax.ops import gated_slot_attention
from gsa_jax.ops import pallas as ops_pallas
from gsa_jax.ops.gla import resolve_impl
from gsa_jax.ops.common import segment_runs
from ops_util import enable_x64, gla_inputs, gsa_inputs, relative_error
from pallas_kernels import tpu_gla, tpu_plan
from pallas_kernels.chunk_math import MAX_CHUNK_DECAY
from reference import gla_reference
from test_sharding import run_with_devices

# name: (B, T, H, Hkv, K, V, M, chunk, segments, initial state), as in test_pallas_kernels
CASES = {
    # grid (2, 2, 3); k/v/s/g of one kv head are time-major, q and the outputs head-major
    "gqa_segments_ragged": (2, 40, 2, 1, 16, 32, 16, 16, True, True),
    "T1": (1, 1, 2, 2, 16, 16, 16, 16, False, True),
    # slow: no initial state and chunk 32; time-major q, k, v at K = V = 128 with head-major M
    "no_state_C32": (1, 70, 2, 2, 16, 16, 64, 32, False, False),
    "K128_V128_M64": (1, 40, 2, 1, 128, 128, 64, 16, True, True),
    # chunk 32: the sub-chunk tier's default size (16) splits it
    "sub_C32": (1, 64, 2, 1, 16, 16, 16, 32, True, True),
}
MAIN = "gqa_segments_ragged"


@pytest.fixture
def tpu(monkeypatch):
    """A faked TPU backend: impl="pallas" takes the TPU kernels, which run in TPU interpret
    mode because jax really runs on the CPU."""
    monkeypatch.setattr(ops_pallas, "backend", lambda: "tpu")


@contextlib.contextmanager
def _registered(case):
    """This file's case in test_pallas_kernels.CASES for the duration of a helper call."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(kernel_tests.CASES, case, CASES[case])
        yield


def _inputs(seed, case, dtype):
    with _registered(case):
        return kernel_tests._case_inputs(seed, case, dtype)


@functools.lru_cache(maxsize=None)
def _tpu_value_and_grads(chunk_size, with_state, with_segments, recompute=False):
    """A jit of its own: test_pallas_kernels' cache may hold a GPU-kernel trace of a key."""
    return kernel_tests._value_and_grads.__wrapped__("pallas", chunk_size, with_state,
                                                     with_segments, recompute)


def _check(case, seed, *, recompute=False, transform=None, dg_atol=None):
    """Values, final states and all gradients of the TPU kernels against float64."""
    with enable_x64():
        args, cot, seg, (C, state, segs) = _inputs(seed, case, jnp.float64)
        args = transform(args) if transform else args
        ref_out, ref_grads = jax.tree.map(np.asarray, kernel_tests._value_and_grads(
            "recurrent", C, state, segs)(args, cot, seg))
    args, cot, seg, _ = _inputs(seed, case, jnp.float32)
    args = transform(args) if transform else args
    out, grads = _tpu_value_and_grads(C, state, segs, recompute)(args, cot, seg)
    if dg_atol is not None:  # relative to the O(1) gradients dq, dk, dv, ds
        dg_atol *= max(np.abs(g).max() for g in ref_grads[:4])
    kernel_tests._compare(out, grads, ref_out, ref_grads, kernel_tests.F32_REL, state,
                          dg_atol=dg_atol)


@pytest.mark.parametrize("case", [MAIN, "T1"])
def test_tpu_kernels_match_recurrent_float64(tpu, case):
    _check(case, seed=500 + list(CASES).index(case))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no_state_C32", "K128_V128_M64"])
def test_tpu_kernels_more_shapes(tpu, case):
    _check(case, seed=500 + list(CASES).index(case))


@pytest.mark.slow
def test_recompute_states(tpu):
    """recompute_states: the backward reruns the state-only walk instead of reading kept
    chunk states; same values and gradients."""
    _check(MAIN, seed=510, recompute=True)


def test_strong_gates_take_the_exact_path(tpu):
    """g ≈ -20 per step: every chunk's decay exceeds MAX_CHUNK_DECAY, so every chunk takes the
    exact in-kernel path; nothing overflows and all values match (dg, ~1e-9 of the other
    gradients here, to an absolute 1e-7 of them: see test_pallas_kernels)."""
    C = CASES[MAIN][7]

    def strong(args):
        q, k, v, s, g, hk0, hv0 = args
        g = -20.0 + 0.5 * jnp.tanh(g)
        assert float(jnp.max(-jnp.sum(g[:, :C], axis=1))) > MAX_CHUNK_DECAY
        return q, k, v, s, g, hk0, hv0

    _check(MAIN, seed=520, transform=strong, dg_atol=1e-7)


def test_sharp_gates_take_the_sub_chunk_tier(tpu):
    """Chunk 32, gates at ~-5 per step for the first half of the sequence (a chunk decays by
    ~160, past MAX_CHUNK_DECAY; each 16-step sub-chunk by ~80, within it: the sub-chunk tier,
    on by default) and ~-20 for the second (sub-chunks past it too: the exact loop), packed
    segments and an initial state: values and gradients match float64. The traced kernels
    hold the tier: both intra-chunk branches gain the nested sub-chunk branch (sub_chunk = 0
    traces without it)."""
    C, T = CASES["sub_C32"][7], CASES["sub_C32"][1]

    def sharp(args):
        q, k, v, s, g, hk0, hv0 = args
        per_step = jnp.where(jnp.arange(T)[None, :, None, None] < T // 2, -5.0, -20.0)
        return q, k, v, s, per_step + 0.5 * jnp.tanh(g), hk0, hv0

    _check("sub_C32", seed=525, transform=sharp)
    q, k, v = (jax.ShapeDtypeStruct((1, 64, 2, 16), jnp.float32) for _ in range(3))
    g, s0 = q, jax.ShapeDtypeStruct((1, 2, 16, 16), jnp.float32)

    def conds(sub_chunk):
        def loss(q, k, v, g, s0):
            o, sT = tpu_gla.gla_chunk_pallas_tpu(q, k, v, g, s0, None, key_gated=True,
                                                 scale=0.25, chunk_size=C, interpret=True,
                                                 sub_chunk=sub_chunk)
            return jnp.sum(o) + jnp.sum(sT)
        return str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, g, s0)
                   ).count("cond[")

    assert tpu_gla.make_plan(q, k, v, key_gated=True, chunk_size=C).sub == 16
    # the forward's output and the backward's gradients each gain one nested branch (the
    # other conds are the kernels' first- and last-chunk `pl.when`s)
    assert conds(None) == conds(0) + 2


def test_bfloat16_inputs_close_to_float64(tpu):
    """bf16 inputs, float32 state and accumulation: output in bf16 within bf16 rounding of
    the float64 reference on the same (rounded) inputs; q, k, v time-major at D = 128."""
    B, T, H, Hkv, K, V, M, C = 1, 40, 2, 2, 128, 128, 32, 16
    x = gsa_inputs(530, B, T, H, Hkv, K, V, M)
    args = [jnp.asarray(a, jnp.bfloat16) for a in x[:5]]
    state = tuple(jnp.asarray(a, jnp.float32) for a in x[5:])
    o, (hk, hv) = jax.jit(lambda *a: gated_slot_attention(
        *a, initial_state=state, return_final_state=True, impl="pallas", chunk_size=C))(*args)
    assert o.dtype == jnp.bfloat16 and hk.dtype == jnp.float32
    with enable_x64():
        ref_o, (ref_hk, ref_hv) = gated_slot_attention(
            *(jnp.asarray(a, jnp.float64) for a in args), return_final_state=True,
            initial_state=tuple(jnp.asarray(a, jnp.float64) for a in state), impl="recurrent")
    for name, a, r in (("o", o, ref_o), ("Hk", hk, ref_hk), ("Hv", hv, ref_hv)):
        kernel_tests._assert_rel(a, np.asarray(r), 2e-2, f"bf16 {name}")


@pytest.mark.slow
def test_two_cores_in_random_order():
    """Two simulated TensorCores taking the parallel (batch, head) grid points in a random
    order (how a megacore chip splits the grid) give the float64 recurrence: no state leaks
    between (batch, head) programs through the scratch buffer."""
    q, k, v, g, s0 = gla_inputs(540, 2, 40, 4, 2, 16, 32, gate_axis="value")
    seg = kernel_tests._segments(541, 2, 40)
    ref_o, ref_s = gla_reference(q, k, v, g, gate_axis="value", initial_state=s0,
                                 segment_ids=seg)
    params = pltpu.InterpretParams(random_seed=7, num_cores_or_threads=2)
    runs = segment_runs(jnp.asarray(seg))
    o, sT = jax.jit(lambda *a: tpu_gla.gla_chunk_pallas_tpu(
        *a, runs, key_gated=False, scale=16 ** -0.5, chunk_size=16, interpret=params))(
        *(jnp.asarray(a, jnp.float32) for a in (q, k, v, g, np.repeat(s0, 2, axis=1))))
    assert relative_error(o, ref_o) < kernel_tests.F32_REL
    assert relative_error(sT[:, ::2], ref_s) < kernel_tests.F32_REL


# -- dispatch ---------------------------------------------------------------------------------

def _kernel_names(fn, *args):
    """Names of the pallas_calls in the jaxpr of fn (traced, not run)."""
    return set(re.findall(r"name=(gla_\w+)", str(jax.make_jaxpr(fn)(*args))))


@pytest.mark.parametrize("backend, expected", [
    ("tpu", {"gla_tpu_forward"}), ("gpu", {"gla_fused_fwd", "gla_strong_intra_fwd"}),
    ("cpu", set())])
def test_auto_picks_the_kernels_of_the_backend(monkeypatch, backend, expected):
    """impl="auto" takes the TPU kernels on a TPU, the GPU kernels on a GPU (the fused walks,
    and the first pass's strong tiles apart, Tuning.strong_gates_apart's default) and the
    chunk form elsewhere (and for float64); impl="pallas" takes the backend's kernels."""
    monkeypatch.setattr(ops_pallas, "backend", lambda: backend)
    K, V, M, C = 16, 32, 16, 16
    auto = "chunk" if backend == "cpu" else "pallas"
    assert resolve_impl("f", "auto", (K, M, V), C, jnp.float32) == auto
    assert resolve_impl("f", "auto", (K, M, V), C, jnp.float64) == "chunk"
    x = gsa_inputs(550, 1, 20, 2, 2, K, V, M, dtype=np.float32)
    fn = functools.partial(gated_slot_attention, impl="auto", chunk_size=C)
    assert _kernel_names(fn, *x[:5]) == expected
    if backend != "cpu":
        assert _kernel_names(functools.partial(fn, impl="pallas"), *x[:5]) == expected


@pytest.mark.parametrize("backend, auto", [("gpu", "pallas"), ("tpu", "chunk"), ("cpu", "chunk")])
def test_auto_takes_wide_head_dims_on_a_gpu_only(monkeypatch, backend, auto):
    """The 1.3B / 2.7B presets' head dim 512 (key slices) and value dims that are multiples of
    128: "auto" takes the kernels on a GPU (timed faster in a whole train step there), the
    chunk form on a TPU (untimed) and a CPU; an explicit "pallas" takes them everywhere, and a
    dim that is neither a kernel dim nor a multiple of 128 never."""
    monkeypatch.setattr(ops_pallas, "backend", lambda: backend)
    assert resolve_impl("f", "auto", (512, 64, 512), 64, jnp.bfloat16) == auto
    assert resolve_impl("f", "auto", (128, 64, 384), 64, jnp.bfloat16) == auto
    assert resolve_impl("f", "pallas", (512, 64, 512), 64, jnp.bfloat16) == "pallas"
    assert resolve_impl("f", "auto", (96, 64, 96), 64, jnp.bfloat16) == "chunk"
    assert resolve_impl("f", "auto", (128, 64, 128), 64, jnp.bfloat16) == (
        "chunk" if backend == "cpu" else "pallas")


@pytest.mark.slow  # a subprocess of 8 simulated devices (35 s for "not slow" on the 2-core CI)
@pytest.mark.parametrize("tier", ["not slow", "slow"])
def test_kernels_run_per_device_slice_under_a_mesh(tier):
    """tests/test_pallas_sharded_devices.py on 8 simulated devices (a subprocess): its fast
    cases (the TPU kernels), then its slow ones (the GPU kernels, interpreted)."""
    run_with_devices("test_pallas_sharded_devices.py", markers=tier)


def test_mesh_axes_are_the_training_mesh_axes():
    """per_shard splits over the axes that training's logical rules give batch and heads."""
    rules = dict(shd.LOGICAL_AXIS_RULES)
    assert tuple(rules["batch"]) == ops_pallas.BATCH_AXES == shd.BATCH_AXES
    assert rules["heads"] == rules["kv_heads"] == ops_pallas.HEAD_AXIS


# -- lowering to Mosaic -----------------------------------------------------------------------

def _out_dtype(key_gated):
    """GSA's pass 1 writes z in float32, pass 2 o in the inputs' dtype."""
    return None if key_gated else jnp.float32


def _gla_grads(*, key_gated, C, segments, recompute):
    """jit of the gradients of a GLA call with the compiled (not interpreted) TPU kernels."""
    def loss(q, k, v, g, s0, runs):
        o, sT = tpu_gla.gla_chunk_pallas_tpu(q, k, v, g, s0, runs if segments else None,
                                             key_gated=key_gated, scale=0.1, chunk_size=C,
                                             recompute_states=recompute,
                                             out_dtype=_out_dtype(key_gated))
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(sT)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def _gsa_pass_shapes(key_gated, B=2, T=256, H=4, Hkv=2, K=128, V=128, M=64,
                     dtype=jnp.bfloat16):
    """Arguments of GSA's pass 1 (value gate: q, k, s, g) or pass 2 (key gate: p, s, v, g)."""
    K, V = (M, V) if key_gated else (K, M)
    sd = jax.ShapeDtypeStruct
    return (sd((B, T, H, K), dtype), sd((B, T, Hkv, K), dtype), sd((B, T, Hkv, V), dtype),
            sd((B, T, Hkv, M), dtype), sd((B, H, K, V), jnp.float32), sd((B, T), jnp.int32))


@pytest.mark.parametrize("key_gated", [False, True], ids=["pass1", "pass2"])
@pytest.mark.parametrize("segments, recompute", [(True, False), (False, True)])
def test_kernels_lower_to_mosaic(key_gated, segments, recompute):
    """GSA's two passes at the paper's head shape (K = V = 128, M = 64, chunk 64, bf16,
    grouped heads), forward and backward, lower to Mosaic TPU kernels: jax.export for the
    TPU platform runs Pallas' TPU lowering, which refuses blocks off the (8, 128) tiling and
    primitives Mosaic lacks (a cumsum in a kernel fails here)."""
    shapes = _gsa_pass_shapes(key_gated)
    fn = _gla_grads(key_gated=key_gated, C=64, segments=segments, recompute=recompute)
    module = jax.export.export(fn, platforms=["tpu"])(*shapes).mlir_module()
    names = set(re.findall(r'kernel_name = "(gla_tpu_\w+)"', module))
    # the grads need no primal output: with recompute the forward is dead code
    assert names == ({"gla_tpu_states", "gla_tpu_backward"} if recompute
                     else {"gla_tpu_forward", "gla_tpu_backward"})


# -- the block plan -----------------------------------------------------------------------------

def test_tile_bytes_by_hand():
    """Mosaic pads a block to (8, 128) 32-bit or (16, 128) 16-bit tiles."""
    assert tpu_plan.tile_bytes(64, 64, 2) == 64 * 128 * 2  # M = 64 lanes pad to 128
    assert tpu_plan.tile_bytes(16, 1, 4) == 16 * 128 * 4
    assert tpu_plan.tile_bytes(1, 64, 4) == 8 * 128 * 4
    assert tpu_plan.tile_bytes(8, 256, 2) == 16 * 256 * 2


def _pallas_calls(fn, *args):
    """{kernel name: pallas_call equation} of the traced fn."""
    calls = {}

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                calls[eqn.params["name"]] = eqn
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (tuple, list)) else [p]):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return calls


def _dot_flops(jaxpr) -> int:
    """Matmul FLOPs (2·m·n·k) of one run of a kernel body on layer-like gates: the fast branch
    of each cond (the strong-gate branch, with the sub-chunk tier's matmuls in a loop, is
    taken by sharp tiles only), bodies of pjit calls once; a matmul in any other loop body is
    not expected."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            k = math.prod(lhs[d] for d in lhs_contract)
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * k
        elif name == "cond":
            # branches[0] is the false branch: the fast path of `is_extreme` (the roofline's
            # case); the strong-gate branch (sub-chunk tier, exact loop) is not counted
            total += _dot_flops(eqn.params["branches"][0].jaxpr)
        elif name in ("while", "scan"):
            body = eqn.params.get("body_jaxpr") or eqn.params["jaxpr"]
            assert _dot_flops(body.jaxpr) == 0, "matmul inside a loop"
        else:
            for p in eqn.params.values():
                inner = getattr(p, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    total += _dot_flops(inner)
    return total


def _block_dims(block_mapping):
    """(rows, cols, itemsize) of a traced BlockSpec: its last two unsqueezed dims."""
    dims = [d.block_size for d in block_mapping.block_shape if hasattr(d, "block_size")]
    return (*dims[-2:], block_mapping.array_aval.dtype.itemsize)


def _moved_bytes(block_mapping, grid) -> int:
    """HBM bytes a block moves over the grid: fetched (or written back) at every step if its
    index follows the chunk (the last grid axis), else once per (batch, head)."""
    index = block_mapping.index_map_jaxpr

    def at(n):
        return jax.core.eval_jaxpr(index.jaxpr, index.consts, 0, 0, n)

    rows, cols, itemsize = _block_dims(block_mapping)
    steps = math.prod(grid) if at(0) != at(1) else math.prod(grid[:2])
    return rows * cols * itemsize * steps


@pytest.mark.parametrize("key_gated", [False, True], ids=["pass1", "pass2"])
@pytest.mark.parametrize("grouped", [False, True], ids=["heads", "grouped"])
def test_block_plan_matches_the_traced_kernels(key_gated, grouped):
    """The VMEM budget's block list is the traced kernels' BlockSpecs, and the roofline's
    FLOPs and HBM bytes per token are the matmuls of their bodies times the grid and the
    bytes their blocks move."""
    shapes = _gsa_pass_shapes(key_gated, Hkv=2 if grouped else 4)
    q, k, v = shapes[:3]
    plan = tpu_gla.make_plan(q, k, v, key_gated=key_gated, chunk_size=64,
                             out_dtype=_out_dtype(key_gated))
    kept, recomputed = (_gla_grads(key_gated=key_gated, C=64, segments=True, recompute=r)
                        for r in (False, True))
    # forward (chunk states kept) and backward; the state-only walk of the recomputation
    calls = {**_pallas_calls(kept, *shapes),
             "gla_tpu_states": _pallas_calls(recomputed, *shapes)["gla_tpu_states"]}
    kinds = {"gla_tpu_forward": "forward", "gla_tpu_states": "states",
             "gla_tpu_backward": "backward"}
    assert set(calls) == set(kinds)
    tokens = plan.B * plan.Tp * plan.H
    for name, kind in kinds.items():
        eqn = calls[name]
        gm = eqn.params["grid_mapping"]
        assert [_block_dims(bm) for bm in gm.block_mappings] == plan.blocks(
            kind, segments=True), name
        flops = _dot_flops(eqn.params["jaxpr"]) * math.prod(gm.grid)
        assert flops / tokens == plan.flops_per_token(kind), name
        moved = sum(_moved_bytes(bm, gm.grid) for bm in gm.block_mappings)
        assert moved / tokens == pytest.approx(
            plan.hbm_bytes_per_token(kind, segments=True), rel=1e-12), name


def test_vmem_budget_fits_the_smallest_tpu():
    """Every shape the kernels take without slicing (K, V in 16..256, chunk 16..128, f32 or
    bf16, either gate, grouped heads, segments) needs less than the 16 MiB default scoped
    VMEM of v4/v5e per grid step; so does test_pallas_kernels' widest case (K = 512, V = 384,
    M = 256). A shape that would not fit is refused with the reason."""
    worst = 0
    for K in ops_pallas.KERNEL_DIMS:
        for V in ops_pallas.KERNEL_DIMS:
            for C in ops_pallas.KERNEL_CHUNKS:
                for itemsize in (2, 4):
                    for key_gated in (False, True):
                        plan = tpu_plan.Plan(B=1, Tp=1024, H=4, Hkv=2, K=K, V=V, C=C,
                                             key_gated=key_gated, itemsize=itemsize,
                                             out_itemsize=4)
                        worst = max(worst, *(plan.vmem_bytes(kind) for kind in
                                             ("forward", "states", "backward")))
    assert worst < tpu_plan.SCOPED_VMEM_BYTES
    for K, V, key_gated in ((512, 256, False), (256, 384, True)):  # GSA's two passes
        plan = tpu_plan.Plan(B=1, Tp=32, H=2, Hkv=1, K=K, V=V, C=16, key_gated=key_gated,
                             itemsize=4, out_itemsize=4)
        assert plan.vmem_bytes("backward") < tpu_plan.SCOPED_VMEM_BYTES
    big = jnp.zeros((1, 16, 1, 4096), jnp.bfloat16)
    with pytest.raises(ValueError, match="VMEM"):
        tpu_gla.gla_chunk_pallas_tpu(big, big, big, big, jnp.zeros((1, 1, 4096, 4096)), None,
                                     key_gated=True, scale=1.0, chunk_size=128)
    odd = jnp.zeros((1, 16, 1, 24))
    with pytest.raises(ValueError, match="K must be a multiple of 16"):
        tpu_gla.gla_chunk_pallas_tpu(odd, odd, odd, odd, jnp.zeros((1, 1, 24, 24)), None,
                                     key_gated=True, scale=1.0, chunk_size=16)

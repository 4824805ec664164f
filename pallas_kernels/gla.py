"""Chunked gated linear attention on the GPU: the forward and backward kernels wired by custom_vjp.

Any gate is safe: a chunk whose accumulated gate exceeds the fast path's bound
(`MAX_CHUNK_DECAY`) takes the exact in-kernel path (chunk_math.py).

Kernels per call (gla_fwd.py, gla_bwd.py): forward = a sequential state pass storing the state
entering every chunk (float32, [B, H, T/C · K, V]) + a chunk-parallel output pass; backward = a
sequential pass for the state gradients + a chunk-parallel gradient pass. By default the chunk
states are kept from the forward for the backward; with `recompute_states=True` the forward keeps
nothing but its inputs and the backward reruns the (cheap, one matmul per chunk) state pass: the
paper's "hidden state recomputation", less memory held between the passes for a little time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp

from pallas_kernels import chunk_math, common, two_level
from pallas_kernels.chunk_math import AUTO_SUB_CHUNK, sub_chunk_for  # noqa: F401 (re-exported)
from pallas_kernels.chunk_math import MAX_CHUNK_DECAY
from pallas_kernels.gla_bwd import dstates_bwd, grads_bwd
from pallas_kernels.gla_fwd import fused_fwd, output_fwd, states_fwd

__all__ = ["KernelConfig", "Tuning", "gla_chunk_pallas", "MAX_CHUNK_DECAY", "MAX_KEY_DIM",
           "set_tuning"]

MAX_KEY_DIM = 256  # widest key dim one launch takes; wider keys run as slices


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Launch parameters: warps of the sequential (state) and parallel (chunk) kernels, Triton's
    pipelining depth (None: 3 for 16-bit inputs, measured best on an H100; 1 for float32,
    whose tiles would not fit twice in shared memory), the value block (`block_v_bwd`: the
    backward kernels' own; each is capped to a divisor of V), and whether forwards
    that keep no chunk states (no gradient wanted, or recompute_states) compute the outputs
    inside the sequential walk (one kernel, no states written) instead of state pass +
    chunk-parallel output pass. `warps_par` stays 8 for the chunk-parallel kernels: 16 warps
    cap them at 128 registers, which still spill, and issue more instructions in all; forward
    +backward 35-54% slower on an H100 (experiments/results/bench_kernels_h100var6.md).

    The fused walk does all per-chunk work on one program's critical path, so it wins only
    while the walk is short: on an H100 at 16K tokens (experiments/results/
    tune_forward_h100.json) it is 25% faster at 32 chunks, 12% slower at 64 and 56% slower
    at 128 chunks than the split pair. `fused_max_chunks` is that crossover.

    The sequential state passes (forward and backward) run B·H·(V/block) programs; where that
    is fewer than `split_below_programs` (0: never), the time axis is cut into big chunks of at
    least `split_min_chunks` chunks that walk in parallel, combined afterwards (two_level.py),
    enough of them for `split_programs` programs: a long single sequence then fills the GPU.
    On an H200 (experiments/results/bench_kernels_h200probe.md, bf16, H = 16, K = V = 128,
    M = 64): 1 x 16384 fwd+bwd 3.81 -> 2.15 ms, 1 x 65536 15.1 -> 7.9 ms; at 8 x 2048 (128
    programs) splitting cost 0.21 ms of 1.87, hence no split from 128 programs up. 2048 target
    programs instead of 512 were slower at 1 x 65536 (8.6 ms); 256 instead of 512 is faster at
    every split shape timed (experiments/results/bench_kernels_h200split.md, one process):
    forward 0.644 / 0.661 / 0.667 / 1.224 / 2.369 ms against 0.706 / 0.734 / 0.724 / 1.284 /
    2.388 at 4 x 4096, 2 x 8192, 1 x 16K, 32K, 64K; forward+backward 1-6% faster.

    A forward that keeps no chunk states and has a split plan (few programs) runs the fused walk
    over the big chunks instead (`fused_split`, two_level.split_fused_forward: final states
    only, combine, then each big chunk's fused walk from its true entering state), with big
    chunks of at most `fused_max_chunks` chunks; no chunk state goes through memory.

    `split_combine_in_kernel` (on: measured faster) moves the combine of a split walk
    into the kernels: the final-state walk also writes each big chunk's decay, and the second
    walk's programs (the fused walk of a forward without chunk states; the state walk of one
    with them, which then writes the true chunk states) fold the leaving states and decays of
    the big chunks before theirs into their entering state (two_level.
    split_fused_forward_in_kernel, split_states_in_kernel); the backward's state-gradient
    walk likewise, from the end (split_dstates_in_kernel). Why: at 1 x 16384 (H200,
    profile_kernels_h200.md) the XLA ops between the kernels of the split forward took 0.126
    ms of 0.66 (chunk decays, the associative scan, the entering states), and the split state
    pass's fix-up is a float32 pass reading and writing every chunk state; the fold is at
    most NB − 1 multiply-adds of a [K, BV] state per program, and a forward with chunk states
    walks once more (without stores), as does the backward. On an H100 (bf16, H 16, K 128,
    M 64; experiments/results/bench_kernels_h100var{,2}.md) the forward goes 0.715 -> 0.657 /
    0.727 -> 0.658 / 0.736 -> 0.668 / 1.349 -> 1.225 ms at 4 x 4096, 2 x 8192, 1 x 16384,
    1 x 32768, forward+backward 0.3-1% faster; where no walk is split, nothing changes.

    `split_fixup` (off: measured slower) runs that split forward in one walk instead of
    two: every big chunk's fused walk from a zero state, then the outputs fixed up with the
    state each walk missed (two_level.split_fused_fixup_forward). On an H200 it costs more than
    the walk it saves: forward 0.977 / 1.003 / 1.024 / 1.905 / 3.761 ms against the two-walk
    0.706 / 0.734 / 0.724 / 1.284 / 2.388 at the shapes above (bench_kernels_h200split; same
    outputs within 2.7e-4): the fix-up is XLA ops in float32 (the walk's float32 outputs, the
    decays' cumulative sums, q ⊙ Λ each go through memory), several passes over [T, H, K]
    where the second walk it replaces is one kernel.

    `block_v_bwd=None` (auto) takes LARGE_STATE_BWD_BLOCK_V for states of at least 128 x 128
    (K and V both >= 128), `block_v` otherwise: the backward holds a state and its gradient
    tile in registers, and at 128 x 128 a value block of 128 spills. On an H100, GSA with
    M = 128 slots at (8, 2048, 16, 128) bf16: forward+backward 6.87 ms with 128, 5.94 ms
    with 64 (experiments/results/bench_kernels_h100.md, shape 5, same run as the peer).

    `sub_chunk` sets the intra-chunk sub-chunk tier (chunk_math.py): a tile whose gate decays
    some channel by more than MAX_CHUNK_DECAY over the chunk is computed as a sum of factored
    terms, one per sub-chunk of this many steps (a divisor of the chunk size), instead of the
    exact loop over positions, which stays for tiles with a sub-chunk past the bound. None
    (auto): AUTO_SUB_CHUNK where it divides the chunk and is smaller, else off; 0: off. Sharp
    gates are what trained models have (MQAR GLA: 27-100% of tiles past the bound). On an
    H200, 8 x 2048, H 16, K 128, M 64, bf16 (experiments/results/bench_gate_strength_h200sub.md):
    with 81% of tiles past the bound the exact loop takes 8.16 / 19.6 ms (fwd / fwd+bwd), the
    tier 0.89 / 2.81 ms; with layer-like gates (no tile past it, the tier never taken) 0.456 /
    1.976 ms without and 0.458 / 1.944 ms with it. A sub-chunk of 32 is faster still at 81%
    (0.63 / 2.32 ms) but falls back to the loop when gates are sharper (100%: 8.5 / 24.0 ms).

    `block_k_bwd` (0: the whole key dim) splits the backward's chunk-parallel gradient kernel
    into key blocks of this many channels (exact: GLA is a sum over key channels; dv and the
    value gate's gradient become partial sums per key block, added after the kernel).
    `key_loop_bwd` runs those key blocks one after another inside each program instead of as
    programs of their own: dv and the value gate's gradient are summed in registers, no
    partial sums go through memory. `block_k_bwd=None` (auto; not the default until
    forward+backward has been timed with it and its gradients checked on the GPU): key
    blocks of LARGE_STATE_BWD_BLOCK_K in a loop for a key-gated pass with a large state (K
    and V both >= 128: GSA's second pass at M = 128, GLA with 128-wide heads), the whole K
    otherwise; an explicit `block_k_bwd` runs its blocks as programs unless `key_loop_bwd`
    is true. Nsight Compute on an H200 (experiments/results/ncu_kernels_h200*.md; GSA at
    8 x 2048, H 16, K = V = 128, bf16; kernel replay, clocks not locked): the gradient
    kernel spills at K = 128 (566-2830 MB of local loads per launch); at M = 128 the
    key-gated pass's kernel takes 2.49 ms with the whole K, 2.26 ms with loops of 32 and
    2.02 ms with loops of 64, while the value-gated pass's gets slower (1.47 ms whole, 2.00
    and 1.60 ms looped), hence key-gated only. Key blocks as programs of their own were
    slower still: forward+backward 8.15 ms against 5.59 (bench_kernels_h200spill.md).

    `strong_gates_apart` (None, auto: a value-gated pass with K <= 128 and V < 128) takes
    the within-chunk paths for tiles past the chunk bound (the sub-chunk tier and the exact loop) out of the fused walk, the
    output kernel and the backward's gradient kernel: they compute the fast path only (0 for
    such a tile), and a chunk-parallel kernel (`gla_fwd.strong_intra`,
    `gla_bwd._strong_intra_grads_kernel`) adds those tiles' terms to o (or dq, dk, dv, dg) in
    place afterwards, its programs for the other tiles reading only their gates. Why: the
    strong paths' code in a kernel costs its fast path registers even when no tile takes
    them. True for every pass; "key" or "value" for the passes gated on that axis only (on
    the H200 the value-gated pass's fused walk spills and the key-gated one's does not).
    Both kernels classify a tile by chunk_math.is_extreme_tile (an exact integer sum, the
    same whatever a kernel's reduction order), so no tile's term is counted twice or never.
    Read on the CPU (kernel_registers --fast-only, triton 3.9.0, 8 x 2048, M = 64), the fused
    walks spill 180 / 84 bytes per thread with them and none without, the output kernel needs
    127 registers instead of 255; on the H200 pass 1's walk reads 143 MB of spilled values
    per launch and takes 0.278 ms against pass 2's 0.152 (ncu_kernels_h200fwd.md). A bf16
    output (or gradient) of a tile past the bound is rounded twice (its fast part, then the
    sum). Timed on an H100 (bf16, 8 x 2048, H 16, K 128; bench_kernels_h100var2.md, fwd /
    fwd+bwd ms): at M = 64 none apart 0.486 / 2.074, "value" 0.423 / 2.021, True 0.503 /
    1.991, "key" 0.560 / 2.060; at M = 128 none 0.760 / 6.148, "value" 0.844 / 6.043,
    True 0.919 / 6.559. Hence the automatic choice: a value-gated pass with K <= 128 and
    V < 128 (GSA's first pass at M <= 64; at M = 32 a tie, 0.320 / 1.326 against 0.315 /
    1.337, bench_kernels_h100var4.md); re-timed on 2026-12-07 (h100var6), True gives
    forward+backward -1.3% / -1.6% / +0.1% at 8 x 2048 / 4 x 4096 / 2 x 8192 (M = 64) and a
    13-15% slower forward, so the rule stands. At K = 256 (GSA with 4 heads of 256) the strong
    kernels asked for more shared memory than an H100 has (RESOURCE_EXHAUSTED at launch,
    h100var4), so the rule keeps K <= 128 (h100var5: the default runs there).

    `split_grads_bwd` (None, auto: a key-gated pass with K = 128 and V >= 128) runs
    the backward's gradient kernel as two on the same grid: the query side (dq and its share of the gate gradient, which goes
    through memory in float32) and the key/value side (dk, dv, the rest, and dg), each with
    the fast within-chunk path only (the strong kernel of `strong_gates_apart` adds the tiles
    past the bound); True, or "key" / "value" for one GSA pass. Why: the single kernel holds
    more tiles than the register file (kernel_registers: 1304 / 1052 bytes per thread spilled
    at M = 64 by the two passes' gradient kernels; Nsight Compute on the H200: 566-2830 MB of
    local loads per launch) and is 66% of GSA's forward+backward at 8 x 2048; the two halves
    recompute the scores and their gradient (one more or two more matmuls per chunk) and read
    the inputs twice. Where it applies, a key loop (key_loop_bwd, block_k_bwd None's choice
    for a large state) is not taken: the split is the alternative to it (whole K, or key
    blocks as programs where key_loop_bwd is false). Timed on an H100 (bf16, 8 x 2048, H 16,
    K 128; bench_kernels_h100var2.md, fwd+bwd ms): at M = 128 no split 6.148, "key" 5.740,
    True 5.786, "value" 6.194; at M = 64 no split 2.074, "key" 2.185, "value" 2.097. Hence
    the automatic choice: a key-gated pass of a large state with K = 128 as timed (GSA's
    second pass at M = 128, plain GLA with 128-wide heads; not K = 256, where the strong
    kernel the split brings overflowed shared memory). Adding the value-gated pass's strong
    tiles apart at M = 128 gave 5.641 ms but a forward 12% slower (h100var3), so the
    automatic choices leave that pass alone there.

    `warps_states` sets the warps of the forward's sequential state walk (`states_fwd`, also
    the final-state walks of a split forward): 0 (the default until timed as above) takes
    `warps_seq`; None (auto) takes 8 for a large state, where 4 spill (at M = 128 208 MB of
    local loads per launch, 0.218 / 0.196 ms against 0.156 / 0.154 with 8), `warps_seq`
    otherwise (at M = 64 8 warps took 0.090 ms against 0.080). The state-gradient walk keeps
    `warps_seq` (8 warps at M = 128: 0.246 / 0.165 ms against 0.210 / 0.131).

    `chunks_per_program_fwd` / `chunks_per_program_bwd` (1: one chunk per program) give each
    program of the chunk-parallel output kernel / gradient kernel that many chunks (the largest
    divisor of the chunk count up to it; whole K only: not with key blocks as programs, not
    with the split gradient kernels), walked one after another in a loop. Why: those kernels
    hold 255 registers per thread at 8 warps, so one program runs per SM and, with no loop
    inside, its loads and its work never overlap (Nsight on the H200: DRAM 27-35% busy, 31
    waves); in a loop Triton's pipeliner (`stages`) can prefetch the next chunk's tiles while
    the current one computes. Strong tiles apart on pass 2 halved its gradient kernel's SASS
    (8808 -> 4264 per thread) and its spills, yet forward+backward moved by only 1.3% (h100var6),
    which points at latency, not issue. A looped launch pipelines at most 2 stages deep: 3
    asked for 256 KB of shared memory in pass 1's gradient kernel (kernel_registers at 8 x
    2048, M = 64: 184 / 256 KB at 3 stages, 104 / 160 KB at 2, against 88 / 96 KB unlooped).
    Timed on an H100 (bench_kernels_h100var7, VARIANT_SET=chunks of
    experiments/kernel_variants_device_call.sh): the loads do become cp.async copies
    (kernel_registers_cpuloads), but forward+backward got 10.5-12.1% slower with 2 chunks per
    program on both kernels (2.036 -> 2.282 ms at 8 x 2048), 14.6-16.3% with 4, 9.6-10.6% with
    2 on the gradient kernel only; the forward moved by under 2%. So 1 (no loop) stays the
    default.

    `cumulative_gates` (off: measured slower): the log gates are summed inside each chunk
    once, in XLA, before the kernels' custom_vjp (chunk_math.chunk_cumsum, float32; GSA sums
    them once for both passes, gsa_pallas), and every kernel reads that b instead of g, with
    b's last row loaded as a tile of its own (gla_fwd.load_gates); the gradient kernels write
    b's gradient, and autodiff turns it into the log gates' one (a reverse sum inside each
    chunk, in XLA). So no kernel scans or sums along a chunk. Why: the walks are bound by
    instruction issue, and read by ptxas (kernel_registers: SASS per chunk, 8 x 2048, M =
    64, with strong_gates_apart) the within-chunk sums are a third of a walk's instructions
    (fused walks 2247 / 2175 -> 1488 / 1557) and of the gradient kernel's reverse sum
    another ~600. The cost: XLA passes over g and b (float32) in the forward and over b's
    gradient (float32) in the backward. A split walk then combines in the kernels
    (split_combine_in_kernel implied; split_fixup, which sums g in XLA, is not taken).
    On an H100 it is slower at every shape timed (experiments/results/bench_kernels_h100var.md,
    bf16, H 16, K 128): forward 0.485 -> 0.588 / 0.760 -> 1.204 / 0.735 -> 0.837 ms and
    forward+backward 2.068 -> 2.564 / 6.151 -> 7.181 / 2.431 -> 2.920 ms at 8 x 2048 M 64,
    8 x 2048 M 128 and 1 x 16384: the fewer instructions do not pay for b's float32 bytes
    (written once, read by every kernel where bf16 g was) and for the XLA sums; with
    strong_gates_apart at M = 128 the strong-tile kernel's float32 tiles exceed the H100's
    shared memory (RESOURCE_EXHAUSTED at launch).

    `key_gate_grad_identity` (off until timed on the GPU): a key-gated pass's gradient kernels
    (the single one, or both halves of the split) compute the gate's gradient from the finished
    dq and dk, db = q ⊙ dq − k ⊙ dk plus the last row's terms (chunk_math.key_gate_grad: b
    enters every term as e^{b} beside q or e^{−b} beside k, so the identity is exact), instead
    of term by term beside each matmul, which keeps a [C, K] float32 accumulator and the
    scaled tiles it multiplies live across the kernel. Read on the CPU (kernel_registers,
    triton 3.9.0, 8 x 2048, H 16, K 128, bf16; experiments/results/kernel_registers_cpuident.md),
    GSA's pass 2 gradient kernel at M = 64 spills 612 / 636 bytes per thread instead of 1304 /
    1160 and issues 7928 SASS instructions instead of 8808 (with strong tiles apart 64 / 64
    and 4040 instead of 244 / 244 and 4264); at M = 128 the split's query side 0 / 0 (182
    registers) instead of 4 / 4, its key/value side 156 / 156 instead of 276 / 276. Value-gated
    passes are unchanged: their identity, db = do ⊙ o − v ⊙ dv, needs the forward's output."""

    warps_seq: int = 4
    warps_par: int = 8
    warps_fused: int = 8
    stages: Optional[int] = None
    block_v: int = 128
    block_v_bwd: Optional[int] = None
    fused_forward: bool = True
    fused_max_chunks: int = 32
    split_below_programs: int = 128
    split_programs: int = 256
    split_min_chunks: int = 8
    fused_split: bool = True
    split_fixup: bool = False
    split_combine_in_kernel: bool = True
    sub_chunk: Optional[int] = None
    block_k_bwd: Optional[int] = 0
    key_loop_bwd: Optional[bool] = None
    warps_states: Optional[int] = 0
    strong_gates_apart: Union[bool, str, None] = None
    split_grads_bwd: Union[bool, str, None] = None
    cumulative_gates: bool = False
    chunks_per_program_fwd: int = 1
    chunks_per_program_bwd: int = 1
    key_gate_grad_identity: bool = False

    def __post_init__(self):
        for name in ("strong_gates_apart", "split_grads_bwd"):
            if getattr(self, name) not in (True, False, None, "key", "value"):
                raise ValueError(f"Tuning.{name} must be true, false, None, 'key' or 'value', "
                                 f"got {getattr(self, name)!r}")
        for name in ("chunks_per_program_fwd", "chunks_per_program_bwd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Tuning.{name} must be a positive integer, got {value!r}")


def _tuning_from_env() -> Tuning:
    """The default launch parameters, with the JSON object of $GSA_PALLAS_TUNING applied
    (e.g. '{"block_v_bwd": 64}'): a way to try launches in a run without code changes."""
    text = os.environ.get("GSA_PALLAS_TUNING", "").strip()
    if not text:
        return Tuning()
    changes = json.loads(text)
    fields = {f.name for f in dataclasses.fields(Tuning)}
    if not isinstance(changes, dict) or not set(changes) <= fields:
        raise ValueError(f"GSA_PALLAS_TUNING must be a JSON object with keys among "
                         f"{sorted(fields)}, got {text!r}")
    return Tuning(**changes)


_TUNING = _tuning_from_env()
LARGE_STATE_BWD_BLOCK_V = 64
LARGE_STATE_BWD_BLOCK_K = 64
LARGE_STATE_WARPS_STATES = 8


def set_tuning(**changes) -> Tuning:
    """Change the default launch parameters for calls traced from now on (benchmarks);
    returns the tuning in force before, so that `set_tuning(**asdict(previous))` restores it."""
    global _TUNING
    previous = _TUNING
    _TUNING = dataclasses.replace(_TUNING, **changes)
    return previous


@contextlib.contextmanager
def tuning(**changes):
    """`with tuning(sub_chunk=0): ...`: set_tuning for the calls traced inside, restored after
    (yields the tuning in force inside)."""
    previous = set_tuning(**changes)
    try:
        yield _TUNING
    finally:
        set_tuning(**dataclasses.asdict(previous))


def current_tuning() -> Tuning:
    """The launch parameters in force (as `set_tuning` left them)."""
    return _TUNING


def resolved_tuning(dtype, K: int, V: int, block_v: Optional[int] = None,
                    key_gated: bool = False) -> Tuning:
    """The tuning in force with its automatic choices made for one launch: pipelining stages by
    dtype, value blocks that divide V, the backward's value and key blocks and the state walk's
    warps by state size and gate side (block_v: the forward value block, None for the
    tuning's)."""
    tuning = _TUNING
    if block_v is not None:
        tuning = dataclasses.replace(tuning, block_v=block_v)
    if tuning.stages is None:
        tuning = dataclasses.replace(tuning, stages=1 if jnp.dtype(dtype).itemsize >= 4 else 3)
    # the value block must divide V (V = 384 with a block of 256 takes 128)
    tuning = dataclasses.replace(tuning, block_v=math.gcd(tuning.block_v, V))
    large_state = K >= 128 and V >= 128   # the automatic choices below: see Tuning
    block_v_bwd = tuning.block_v_bwd
    if block_v_bwd is None:
        block_v_bwd = LARGE_STATE_BWD_BLOCK_V if large_state else tuning.block_v
    block_k_bwd, key_loop = tuning.block_k_bwd, tuning.key_loop_bwd
    if block_k_bwd is None:
        auto_blocks = key_gated and large_state
        block_k_bwd = LARGE_STATE_BWD_BLOCK_K if auto_blocks else 0
        key_loop = auto_blocks if key_loop is None else key_loop
    block_k_bwd = math.gcd(block_k_bwd, K) if block_k_bwd else 0   # 0: whole K
    warps_states = tuning.warps_states
    if warps_states is None:
        warps_states = LARGE_STATE_WARPS_STATES if large_state else tuning.warps_seq
    warps_states = warps_states or tuning.warps_seq   # 0: warps_seq
    apart, split_grads = tuning.strong_gates_apart, tuning.split_grads_bwd
    # timed on an H100 (see Tuning): where each gains; K <= 128 as timed (at K = 256 the
    # strong kernels overflowed shared memory)
    if apart is None:
        apart = not key_gated and K <= 128 and V < 128
    if split_grads is None:
        split_grads = key_gated and large_state and K <= 128
    return dataclasses.replace(tuning, block_v_bwd=math.gcd(block_v_bwd, V),
                               block_k_bwd=block_k_bwd if block_k_bwd < K else 0,
                               key_loop_bwd=bool(key_loop), warps_states=warps_states,
                               strong_gates_apart=apart, split_grads_bwd=split_grads)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static settings of one kernel call (hashable: they select the compiled kernels)."""

    key_gated: bool
    scale: float
    chunk_size: int
    recompute_states: bool
    out_dtype: Any
    interpret: bool
    tuning: Tuning
    cumulative: bool = False   # g holds b, the log gates summed inside each chunk

    @property
    def combine_in_kernel(self) -> bool:
        """Whether a split walk combines in its kernels: Tuning.split_combine_in_kernel, and
        always with g holding b (the XLA combine's chunk decays are sums of g)."""
        return self.tuning.split_combine_in_kernel or self.cumulative

    def kw(self, parallel: bool, with_scale: bool = True, fused: bool = False,
           backward: bool = False):
        t = self.tuning
        walk_warps = t.warps_seq if backward else t.warps_states
        warps = t.warps_fused if fused else (t.warps_par if parallel else walk_warps)
        block_v = t.block_v_bwd if backward and t.block_v_bwd else t.block_v
        kw = dict(key_gated=self.key_gated, chunk_size=self.chunk_size, block_v=block_v,
                  interpret=self.interpret, num_stages=t.stages, num_warps=warps)
        if parallel or fused:   # the kernels that compute intra-chunk terms
            kw["sub_chunk"] = sub_chunk_for(t.sub_chunk, self.chunk_size)
        side = "key" if self.key_gated else "value"
        split = parallel and backward and t.split_grads_bwd in (True, side)
        if parallel and backward and t.block_k_bwd and not (split and t.key_loop_bwd):
            kw.update(block_k=t.block_k_bwd, key_loop=t.key_loop_bwd)
        if split:
            kw["split"] = True
        apart = t.strong_gates_apart in (True, side)
        if (parallel or fused) and apart:
            kw["strong_apart"] = True
            if fused:
                kw["strong_warps"] = t.warps_par
        if with_scale:
            kw["scale"] = self.scale
        if self.cumulative:   # every kernel then reads g as b
            kw["cumulative"] = True
        if parallel and backward and t.key_gate_grad_identity and self.key_gated:
            kw["identity"] = True
        if parallel:
            kw["chunks"] = t.chunks_per_program_bwd if backward else t.chunks_per_program_fwd
            if kw["chunks"] > 1:
                # the loop's loads pipelined 3 deep ask 256 KB of shared memory in pass 1's
                # gradient kernel (kernel_registers_cpuchunks.md; an H100 has 227): 2 deep
                kw["num_stages"] = min(kw["num_stages"], 2)
        return kw


def sum_groups(x, groups: int):
    """[B, T, H, D] per query head -> [B, T, H / groups, D], summing each group."""
    if groups == 1:
        return x
    B, T, H, D = x.shape
    return x.reshape(B, T, H // groups, groups, D).sum(axis=3)


@functools.lru_cache(maxsize=None)
def _kernel_fn(cfg: KernelConfig):
    """The custom_vjp function of padded inputs for one static configuration."""
    def split_plan(q, v, block_v):
        t = cfg.tuning
        programs = q.shape[0] * q.shape[2] * (v.shape[3] // min(block_v, v.shape[3]))
        return two_level.plan(programs, q.shape[1] // cfg.chunk_size,
                              below=t.split_below_programs, target=t.split_programs,
                              min_chunks=t.split_min_chunks)

    def states(q, k, v, g, s0, runs):
        kw = cfg.kw(parallel=False, with_scale=False)
        kernel = functools.partial(states_fwd, **kw)
        sp = split_plan(q, v, kw["block_v"])
        if sp is None:
            return kernel(q, k, v, g, s0, runs)
        if cfg.combine_in_kernel:
            final_fn = functools.partial(states_fwd, final_only=True, **kw)
            return two_level.split_states_in_kernel(final_fn, kernel, q, k, v, g, s0, runs,
                                                    sp=sp, C=cfg.chunk_size)
        return two_level.split_states(kernel, q, k, v, g, s0, runs, sp=sp, C=cfg.chunk_size,
                                      key_gated=cfg.key_gated)

    def state_grads(q, v, g, runs, do, dsT):
        kw = cfg.kw(parallel=False, backward=True)
        kernel = functools.partial(dstates_bwd, **kw)
        sp = split_plan(q, v, kw["block_v"])
        if sp is None:
            return kernel(q, v, g, runs, do, dsT)
        if cfg.combine_in_kernel:
            final_fn = functools.partial(dstates_bwd, final_only=True, **kw)
            return two_level.split_dstates_in_kernel(final_fn, kernel, q, v, g, runs, do, dsT,
                                                     sp=sp, C=cfg.chunk_size)
        return two_level.split_dstates(kernel, q, v, g, runs, do, dsT, sp=sp, C=cfg.chunk_size,
                                       key_gated=cfg.key_gated)

    def fused_split_plan(q, v):
        """The split plan of a fused forward (None: no split), big chunks of at most
        fused_max_chunks chunks."""
        t = cfg.tuning
        sp = split_plan(q, v, cfg.kw(parallel=False, fused=True)["block_v"])
        if sp is None or not t.fused_split or sp.L <= t.fused_max_chunks:
            return sp
        L = t.fused_max_chunks
        return two_level.SplitPlan(N=sp.N, L=L, NB=-(-sp.N // L))

    def forward(q, k, v, g, s0, runs, keep_states: bool):
        """(o, final state, entering states or None)."""
        t = cfg.tuning
        chunks = q.shape[1] // cfg.chunk_size
        out_dtype = cfg.out_dtype or q.dtype
        fused = t.fused_forward and t.fused_max_chunks > 0 and not keep_states
        sp = fused_split_plan(q, v) if fused and t.fused_split else None
        if sp is not None and t.split_fixup and not cfg.cumulative:   # it sums g in XLA
            fused_fn = functools.partial(fused_fwd, out_dtype=jnp.float32,
                                         **cfg.kw(parallel=False, fused=True))
            o, sT = two_level.split_fused_fixup_forward(
                fused_fn, q, k, v, g, s0, runs, sp=sp, C=cfg.chunk_size,
                key_gated=cfg.key_gated, scale=cfg.scale, out_dtype=out_dtype)
            return o, sT, None
        if sp is not None:
            final_fn = functools.partial(states_fwd, final_only=True,
                                         **cfg.kw(parallel=False, with_scale=False))
            fused_fn = functools.partial(fused_fwd, out_dtype=out_dtype,
                                         **cfg.kw(parallel=False, fused=True))
            if cfg.combine_in_kernel:
                o, sT = two_level.split_fused_forward_in_kernel(
                    final_fn, fused_fn, q, k, v, g, s0, runs, sp=sp, C=cfg.chunk_size)
                return o, sT, None
            o, sT = two_level.split_fused_forward(final_fn, fused_fn, q, k, v, g, s0, runs,
                                                  sp=sp, C=cfg.chunk_size,
                                                  key_gated=cfg.key_gated)
            return o, sT, None
        if fused and chunks <= t.fused_max_chunks:
            o, sT = fused_fwd(q, k, v, g, s0, runs, out_dtype=out_dtype,
                              **cfg.kw(parallel=False, fused=True))
            return o, sT, None
        chunk_states, sT = states(q, k, v, g, s0, runs)
        o = output_fwd(q, k, v, g, chunk_states, runs, out_dtype=cfg.out_dtype or q.dtype,
                       **cfg.kw(parallel=True))
        return o, sT, chunk_states

    def backward(args, chunk_states, cotangents):
        q, k, v, g, s0, runs = args
        do, dsT = cotangents
        dstates, ds0 = state_grads(q, v, g, runs, do, dsT)
        # with g holding b, dg is b's gradient (the caller's chunk_cumsum turns it into the
        # log gates' one)
        dq, dk, dv, dg = grads_bwd(q, k, v, g, runs, chunk_states, dstates, do,
                                   **cfg.kw(parallel=True, backward=True))
        groups = q.shape[2] // k.shape[2]
        dq = dq.sum(0, dtype=dq.dtype)
        dk = sum_groups(dk.sum(0, dtype=dk.dtype), groups)
        if dv.ndim == 5:   # partial sums per key block (Tuning.block_k_bwd)
            dv = dv.sum(0)
            dg = dg if cfg.key_gated else dg.sum(0)
        dv = sum_groups(dv, groups)
        dg = sum_groups(dg.sum(0, dtype=dg.dtype) if cfg.key_gated else dg, groups)
        return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg.astype(g.dtype),
                ds0.astype(s0.dtype), None)

    return common.keep_or_recompute_vjp(forward, lambda *args: states(*args)[0], backward,
                                        recompute_states=cfg.recompute_states)


def gla_chunk_pallas(q, k, v, g, initial_state, runs: Optional[jax.Array], *, key_gated: bool,
                     scale: float, chunk_size: int = 64, block_v: Optional[int] = None,
                     recompute_states: bool = False, out_dtype=None, interpret: bool = False,
                     gates_cumulative: bool = False):
    """GLA by the Pallas kernels; differentiable in every array argument.

    Args:
      q: [B, T, H, K]; k: [B, T, Hkv, K]; v: [B, T, Hkv, V]; g: [B, T, Hkv, K] (key_gated) or
        [B, T, Hkv, V]; initial_state: [B, H, K, V] (one per query head); runs: [B, T] int32
        contiguous-segment index (`gsa_jax.ops.common.segment_runs`) or None.
      K and V: powers of two from 16 to 256, or multiples of 128 beyond: a key dim above
        MAX_KEY_DIM is split into slices (see below), a value dim is tiled by the value block.
        chunk_size: a power of two ≥ 16.
      block_v: value block of the launch; None takes the default tuning (`set_tuning`).
      gates_cumulative: g holds b = chunk_math.chunk_cumsum(log gates, chunk_size) instead of
        the log gates (float32; e.g. summed once for GSA's two passes), and the gradient for it
        is b's. Under Tuning.cumulative_gates a plain g is summed so here, outside the kernels'
        custom_vjp: autodiff then forms the log gates' gradient from b's, a reverse sum inside
        each chunk, in XLA, and no kernel sums along a chunk.
    Returns:
      (o [B, T, H, V] in out_dtype (default q's), final state [B, H, K, V] float32).
    """
    if current_tuning().cumulative_gates and not gates_cumulative:
        g, gates_cumulative = chunk_math.chunk_cumsum(g, chunk_size), True
    K = q.shape[-1]
    if K > MAX_KEY_DIM:
        # A chunk's [C, K] q/k tiles live in registers, so wide keys go in slices. GLA is a sum
        # over key channels (o_t = Σ_k q_tk · (state and intra terms of channel k); the gate of
        # a key channel, if any, touches that channel only), so the slices' outputs add up
        # exactly and their states stack along K.
        width = MAX_KEY_DIM if K % MAX_KEY_DIM == 0 else 128
        kw = dict(key_gated=key_gated, scale=scale, chunk_size=chunk_size, block_v=block_v,
                  recompute_states=recompute_states, out_dtype=jnp.float32, interpret=interpret,
                  gates_cumulative=gates_cumulative)
        outs, states = [], []
        for lo in range(0, K, width):
            part = slice(lo, lo + width)
            o_part, s_part = gla_chunk_pallas(
                q[..., part], k[..., part], v, g[..., part] if key_gated else g,
                initial_state[:, :, part], runs, **kw)
            outs.append(o_part)
            states.append(s_part)
        return sum(outs).astype(out_dtype or q.dtype), jnp.concatenate(states, axis=2)
    T = q.shape[1]
    C = chunk_size
    # b past the end holds its last value (zero log gates there)
    q, k, v, g, runs = common.pad_to_chunks(q, k, v, g, runs, C,
                                            g_mode="edge" if gates_cumulative else "constant")
    tuning = resolved_tuning(q.dtype, K, v.shape[-1], block_v, key_gated=key_gated)
    cfg = KernelConfig(key_gated=key_gated, scale=float(scale), chunk_size=C,
                       recompute_states=recompute_states,
                       out_dtype=None if out_dtype is None else jnp.dtype(out_dtype),
                       interpret=interpret, tuning=tuning, cumulative=gates_cumulative)
    o, sT = _kernel_fn(cfg)(q, k, v, g, initial_state.astype(jnp.float32), runs)
    return o[:, :T], sT

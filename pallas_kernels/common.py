"""Pieces shared by the Pallas kernels: matmuls with a fixed operand dtype, chunk masks."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def compiler_params(num_warps: int, num_stages: int):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


@dataclasses.dataclass(frozen=True)
class Dot:
    """2-D matmuls with float32 accumulation.

    Operands are cast to the inputs' dtype: bf16/f16 inputs run on the tensor cores; float32
    inputs use three-pass TF32 on the GPU (close to float32 accuracy) and exact float32 when
    interpreted on the CPU. `f32_precision` overrides the float32 choice: the TPU kernels pass
    HIGHEST (Mosaic takes DEFAULT or HIGHEST only, and DEFAULT would round to bf16).
    """

    dtype: Any
    interpret: bool = False
    f32_precision: Any = None

    def _dot(self, a, b, contract):
        dtype = jnp.dtype(self.dtype)
        if dtype == jnp.float32:
            precision = self.f32_precision or (
                lax.Precision.HIGHEST if self.interpret
                else lax.DotAlgorithmPreset.TF32_TF32_F32_X3)
        else:
            precision = None
        return lax.dot_general(a.astype(dtype), b.astype(dtype), (contract, ((), ())),
                               precision=precision, preferred_element_type=jnp.float32)

    def nn(self, a, b):  # a @ b
        return self._dot(a, b, ((1,), (0,)))

    def nt(self, a, b):  # a @ bᵀ
        return self._dot(a, b, ((1,), (1,)))

    def tn(self, a, b):  # aᵀ @ b
        return self._dot(a, b, ((0,), (0,)))

    def rounded(self, x):
        """x (float32) as the matmuls see it. A gate gradient built as dq̂ ⊙ q̂ − dk̂ ⊙ k̂ must
        multiply by the operands the matmuls used: each pair (t, i) then enters db_t and db_i
        with the same value, and the diagonal pairs (decay 1, no gate gradient) cancel instead
        of leaving a bf16 rounding residue as large as the true gradient under sharp gates."""
        dtype = jnp.dtype(self.dtype)
        return x if dtype == jnp.float32 else x.astype(dtype).astype(jnp.float32)


def keep_or_recompute_vjp(forward, states, backward, *, recompute_states: bool):
    """fn(*args) -> (o, final state), differentiable by custom_vjp, for both kernel families.

    forward(*args, keep_states) -> (o, final state, chunk states or None);
    states(*args) -> the chunk states (the backward's recomputation);
    backward(args, chunk states, (do, dsT)) -> the cotangents of args.
    Between the passes the chunk states are kept, or (recompute_states) only the inputs.
    """
    @jax.custom_vjp
    def fn(*args):
        o, sT, _ = forward(*args, keep_states=False)
        return o, sT

    def fn_fwd(*args):
        keep = not recompute_states
        o, sT, chunk_states = forward(*args, keep_states=keep)
        return (o, sT), (args, chunk_states if keep else None)

    def fn_bwd(res, cotangents):
        args, chunk_states = res
        if chunk_states is None:
            chunk_states = states(*args)
        return backward(args, chunk_states, cotangents)

    fn.defvjp(fn_fwd, fn_bwd)
    return fn


def pad_to_chunks(q, k, v, g, runs, C: int, g_mode: str = "constant"):
    """Pad the time axis (1) of [B, T, heads, D] inputs to a multiple of C. Zero k, v and g
    past the end leave the state untouched; runs [B, T] (or None) repeat their last run.
    g_mode="edge": g repeats its last step (g holding the gates' sums inside each chunk, as
    zero gates past the end would leave them)."""
    T = q.shape[1]
    Tp = -(-T // C) * C
    if Tp != T:
        pad = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
        g = jnp.pad(g, pad, mode=g_mode)
        if runs is not None:
            runs = jnp.pad(runs, ((0, 0), (0, Tp - T)), mode="edge")
    if runs is not None:
        runs = runs.astype(jnp.int32)
    return q, k, v, g, runs


def causal_mask(C: int):
    rows = lax.broadcasted_iota(jnp.int32, (C, C), 0)
    cols = lax.broadcasted_iota(jnp.int32, (C, C), 1)
    return rows >= cols


@dataclasses.dataclass
class ChunkMasks:
    """Masks of one chunk. Without segments the vectors are all-ones (Python floats 1.0)."""

    intra: jax.Array  # [C, C] bool: causal and same segment
    from_state: Any  # [C] f32: 1 where the entering state reaches position t
    into: Any  # [C] f32: 1 where position i writes into the leaving state
    survive: Any  # scalar f32: 1 if the entering state survives the whole chunk
    run_last: jax.Array  # scalar int32: segment run of the chunk's last position
    runs: Any = None  # [C] int32 segment runs of the chunk, None without segments

    def column(self, i):
        """[C] bool: the targets t that source position i reaches (t ≥ i, same segment)."""
        C = self.intra.shape[0]
        reach = lax.broadcasted_iota(jnp.int32, (C,), 0) >= i
        if self.runs is None:
            return reach
        return jnp.logical_and(reach, self.runs == pick_row(self.runs, i))


def pick_row(x, i):
    """Row i of a register tile (x[i], as a masked sum: Triton cannot index a tile)."""
    rows = lax.broadcasted_iota(jnp.int32, (x.shape[0],) + (1,) * (x.ndim - 1), 0)
    return jnp.sum(jnp.where(rows == i, x, jnp.zeros_like(x)), axis=0)


def chunk_masks(runs_ref: Optional[Any], rows, run_prev, causal) -> ChunkMasks:
    """Masks of the chunk at `rows`; `run_prev` is the run of the position before it."""
    C = causal.shape[0]
    if runs_ref is None:
        ones = jnp.ones((C,), jnp.float32)
        return ChunkMasks(causal, ones, ones, jnp.float32(1.0), jnp.int32(0))
    r = runs_ref[rows]
    run_last = jnp.max(r)  # runs never decrease along time
    same = r[:, None] == r[None, :]
    return ChunkMasks(
        intra=jnp.logical_and(causal, same),
        from_state=(r == run_prev).astype(jnp.float32),
        into=(r == run_last).astype(jnp.float32),
        survive=(run_last == run_prev).astype(jnp.float32),
        run_last=run_last,
        runs=r,
    )


@dataclasses.dataclass(frozen=True)
class Layout:
    """Shapes of one launch and the BlockSpecs that give each program its slabs.

    Every operand is handed over whole along time ([Tp, width] per head); a program selects its
    chunk rows itself. Two grids: "sequential" (B, H, NV), one program walking all chunks of a
    (batch, head, value block), and "parallel" (N, B·H, NV·NK), one program per chunk, value
    block and key block (`BK`: the parallel gradient kernel's key block, 0 for the whole K; GLA
    is a sum over key channels, so key blocks give exact slices of dq, dk and the key gate's
    gradient, and partial sums of dv and the value gate's gradient). `P` chunks per program
    on the parallel grid (whole K only): program n computes chunks n·P ... n·P + P − 1 one
    after another (`for_each_chunk`), so Triton can pipeline the next chunk's loads under
    the current chunk's work.
    """

    B: int
    Tp: int
    H: int
    Hkv: int
    K: int
    V: int
    C: int
    BV: int
    key_gated: bool
    parallel: bool
    sub: int = 0   # the intra-chunk sub-chunk tier's size (chunk_math; 0: none)
    BK: int = 0    # key block of the parallel grid (0: the whole K)
    P: int = 1     # chunks per program of the parallel grid

    def __post_init__(self):
        if self.P > 1 and (not self.parallel or self.BK or self.N % self.P):
            raise ValueError(f"{self.P} chunks per program need the parallel grid, the whole "
                             f"K and a chunk count ({self.N}) that they divide")

    @property
    def N(self) -> int:
        return self.Tp // self.C

    @property
    def NV(self) -> int:
        return self.V // self.BV

    @property
    def KB(self) -> int:
        """The key width one program holds."""
        return self.BK or self.K

    @property
    def NK(self) -> int:
        return self.K // self.KB

    @property
    def group(self) -> int:
        return self.H // self.Hkv

    @property
    def grid(self) -> tuple:
        if self.parallel:
            return (self.N // self.P, self.B * self.H, self.NV * self.NK)
        if self.NK != 1:
            raise ValueError("key blocks are for the parallel (chunk) grid only")
        return (self.B, self.H, self.NV)

    def _bhj(self, fn):
        """Index map in terms of (batch, head, value block, chunk, key block)."""
        if self.parallel:
            H, NK = self.H, self.NK
            return lambda n, bh, jk: fn(bh // H, bh % H, jk // NK, n, jk % NK)
        return lambda b, h, j: fn(b, h, j, 0, 0)

    def seq(self, width: int, kv_head: bool, value_block: bool, key_block: bool = False):
        """[Tp, width] slab of a [B, Tp, heads, D] array: D in value blocks, key blocks
        (width KB) or whole."""
        G = self.group
        return pl.BlockSpec((None, self.Tp, None, width), self._bhj(
            lambda b, h, j, n, kb: (b, 0, h // G if kv_head else h,
                                    j if value_block else (kb if key_block else 0))))

    def q(self):
        return self.seq(self.KB, kv_head=False, value_block=False, key_block=True)

    def k(self):
        return self.seq(self.KB, kv_head=True, value_block=False, key_block=True)

    def v(self):
        return self.seq(self.BV, kv_head=True, value_block=True)

    def g(self):
        if self.key_gated:
            return self.seq(self.KB, kv_head=True, value_block=False, key_block=True)
        return self.seq(self.BV, kv_head=True, value_block=True)

    def o(self):
        return self.seq(self.BV, kv_head=False, value_block=True)

    def runs(self):
        return pl.BlockSpec((None, self.Tp), self._bhj(lambda b, h, j, n, kb: (b, 0)))

    def state(self):
        """[K, BV] block of a [B, H, K, V] state."""
        return pl.BlockSpec((None, None, self.K, self.BV),
                            self._bhj(lambda b, h, j, n, kb: (b, h, 0, j)))

    def states(self):
        """Per-chunk states [B, H, N·K, V]: all chunks (sequential) or chunk n's key block kb
        (parallel; with P chunks per program, program n's P chunks, [P·K, BV])."""
        NK = self.NK
        rows = self.KB * self.P if self.parallel else self.N * self.K
        return pl.BlockSpec((None, None, rows, self.BV),
                            self._bhj(lambda b, h, j, n, kb: (b, h, n * NK + kb, j)))

    # Rows of a split time axis (two_level.py, the in-kernel combine): the sequential grid runs
    # over rows r = b·NB + j, big chunk j of batch b; these blocks let a row's program read its
    # batch's arrays and the other big chunks of its batch.

    @property
    def DG(self) -> int:
        """Width of a program's gate tile: K (key gate) or the value block (value gate)."""
        return self.K if self.key_gated else self.BV

    def batch_state(self, NB: int):
        """[K, BV] block of a [B, H, K, V] state, read by the NB rows of its batch."""
        return pl.BlockSpec((None, None, self.K, self.BV), lambda r, h, j: (r // NB, h, 0, j))

    def batch_chunk_states(self, NB: int):
        """Row r's [L·K, BV] block of the chunk states [B, H, NB·L·K, V] of its batch, in time
        order (L = N, the row's chunks)."""
        return pl.BlockSpec((None, None, self.N * self.K, self.BV),
                            lambda r, h, j: (r // NB, h, r % NB, j))

    def big_chunk_states(self, NB: int):
        """[NB, K, BV] block of [B, NB, H, K, V]: one state per big chunk of the batch."""
        return pl.BlockSpec((None, NB, None, self.K, self.BV),
                            lambda r, h, j: (r // NB, 0, h, 0, j))

    def big_chunk_decays(self, NB: int):
        """[NB, DG] block of [B, NB, H, NV, DG]: one decay per big chunk of the batch."""
        return pl.BlockSpec((None, NB, None, None, self.DG),
                            lambda r, h, j: (r // NB, 0, h, j, 0))

    def decay(self):
        """[DG] block of a per-row decay [R, H, NV, DG]."""
        return pl.BlockSpec((None, None, None, self.DG), lambda r, h, j: (r, h, j, 0))

    def per_value_block(self, width: int, key_block: bool = False):
        """[Tp, width] slab of an [NV, B, Tp, H, D] output (partial sums per value block; D in
        key blocks of `width` with key_block)."""
        return pl.BlockSpec((None, None, self.Tp, None, width),
                            self._bhj(lambda b, h, j, n, kb: (j, b, 0, h,
                                                              kb if key_block else 0)))

    def per_key_block(self):
        """[Tp, BV] slab of an [NK, B, Tp, H, V] output (partial sums per key block)."""
        return pl.BlockSpec((None, None, self.Tp, None, self.BV),
                            self._bhj(lambda b, h, j, n, kb: (kb, b, 0, h, j)))


def chunks_per_program(wanted: int, lay: Layout) -> int:
    """The chunks per program a parallel launch takes: the largest divisor of the chunk count
    up to `wanted`, and 1 with key blocks as programs."""
    if lay.BK:
        return 1
    return max(p for p in range(1, max(wanted, 1) + 1) if lay.N % p == 0)


def for_each_chunk(lay: Layout, fn):
    """fn(n, j) for the chunks of this program of the parallel grid: chunk n = pid·P + j, j its
    place among the program's P (the row offset j·K of its state in a `states()` block). One
    chunk: fn runs once, unrolled; several: a loop (what Triton software-pipelines)."""
    if lay.P == 1:
        fn(pl.program_id(0), 0)
        return
    first = pl.program_id(0) * lay.P   # outside the loop: interpret mode reads it only here

    def body(j, carry):
        fn(first + j, j)
        return carry

    lax.fori_loop(0, lay.P, body, jnp.int32(0))


def chunk_state(ref, lay: Layout, j, cols=None):
    """The state block [KB, BV] of a program's chunk j from its `states()` block (the whole
    block when the program has one chunk), or its rows `cols` (a pl.ds of key channels)."""
    if lay.P == 1:
        return ref[...] if cols is None else ref[cols, :]
    if cols is None:
        return ref[pl.ds(j * lay.KB, lay.KB), :]
    return ref[pl.ds(j * lay.KB + cols.start, cols.size), :]


def chunk_run_prev(runs_ref, n, C):
    """Run index of the position just before chunk n (0 for the first chunk)."""
    if runs_ref is None:
        return jnp.int32(0)
    before = runs_ref[pl.ds(jnp.maximum(n * C - 1, 0), 1)]
    return jnp.where(n == 0, 0, jnp.sum(before))

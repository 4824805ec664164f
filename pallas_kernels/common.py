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


def pad_to_chunks(q, k, v, g, runs, C: int):
    """Pad the time axis (1) of [B, T, heads, D] inputs to a multiple of C. Zero k, v and g
    past the end leave the state untouched; runs [B, T] (or None) repeat their last run."""
    T = q.shape[1]
    Tp = -(-T // C) * C
    if Tp != T:
        pad = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
        q, k, v, g = (jnp.pad(x, pad) for x in (q, k, v, g))
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
    (batch, head, value block), and "parallel" (N, B·H, NV), one program per chunk.
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

    @property
    def N(self) -> int:
        return self.Tp // self.C

    @property
    def NV(self) -> int:
        return self.V // self.BV

    @property
    def group(self) -> int:
        return self.H // self.Hkv

    @property
    def grid(self) -> tuple:
        if self.parallel:
            return (self.N, self.B * self.H, self.NV)
        return (self.B, self.H, self.NV)

    def _bhj(self, fn):
        """Index map in terms of (batch, head, value block, chunk)."""
        if self.parallel:
            H = self.H
            return lambda n, bh, j: fn(bh // H, bh % H, j, n)
        return lambda b, h, j: fn(b, h, j, 0)

    def seq(self, width: int, kv_head: bool, value_block: bool):
        """[Tp, width] slab of a [B, Tp, heads, D] array."""
        G = self.group
        return pl.BlockSpec((None, self.Tp, None, width), self._bhj(
            lambda b, h, j, n: (b, 0, h // G if kv_head else h, j if value_block else 0)))

    def q(self):
        return self.seq(self.K, kv_head=False, value_block=False)

    def k(self):
        return self.seq(self.K, kv_head=True, value_block=False)

    def v(self):
        return self.seq(self.BV, kv_head=True, value_block=True)

    def g(self):
        if self.key_gated:
            return self.seq(self.K, kv_head=True, value_block=False)
        return self.seq(self.BV, kv_head=True, value_block=True)

    def o(self):
        return self.seq(self.BV, kv_head=False, value_block=True)

    def runs(self):
        return pl.BlockSpec((None, self.Tp), self._bhj(lambda b, h, j, n: (b, 0)))

    def state(self):
        """[K, BV] block of a [B, H, K, V] state."""
        return pl.BlockSpec((None, None, self.K, self.BV),
                            self._bhj(lambda b, h, j, n: (b, h, 0, j)))

    def states(self):
        """Per-chunk states [B, H, N·K, V]: all chunks (sequential) or chunk n (parallel)."""
        rows = self.K if self.parallel else self.N * self.K
        return pl.BlockSpec((None, None, rows, self.BV),
                            self._bhj(lambda b, h, j, n: (b, h, n, j)))

    def per_value_block(self, width: int):
        """[Tp, width] slab of an [NV, B, Tp, H, width] output (partial sums per value block)."""
        return pl.BlockSpec((None, None, self.Tp, None, width),
                            self._bhj(lambda b, h, j, n: (j, b, 0, h, 0)))


def chunk_run_prev(runs_ref, n, C):
    """Run index of the position just before chunk n (0 for the first chunk)."""
    if runs_ref is None:
        return jnp.int32(0)
    before = runs_ref[pl.ds(jnp.maximum(n * C - 1, 0), 1)]
    return jnp.where(n == 0, 0, jnp.sum(before))

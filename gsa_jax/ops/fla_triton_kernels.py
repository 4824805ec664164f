"""Launchable entry points for the peer's chunked-GSA Triton kernels (flash-linear-attention 0.6.0).

Each function below is a Triton kernel of ours whose body is one call of one of fla's kernels
(inlined by Triton), with the parameters reordered into the convention `jax_triton.triton_call`
needs: array inputs first, then scalars, then the outputs, then the compile-time constants. fla's
own parameter lists interleave outputs with inputs, and its Python wrappers allocate torch
tensors; here the arrays are JAX's. Nothing of fla's computation is changed: what it makes
optional (initial and final states, GQA inside the kernel, the scalar decay) is passed as off,
which is what `fla.ops.gsa.chunk_gsa` does without states; packed rows (fla's cu_seqlens) are
the constant VARLEN.

Importing this module imports fla and triton (and through fla, torch); `gsa_jax.ops.fla_triton`
imports it only when the peer is asked for. In Triton's interpreter (TRITON_INTERPRET=1 set
before the import) the same functions run on a CPU, which is how the tests check the wiring.

Parameter names follow fla's (see its `chunk_gsa_fwd`, `chunk_gla_fwd`, `chunk_gla_bwd`,
`chunk_gsa_bwd_k`, `chunk_fwd_h`, `chunk_bwd_dh`); an output that fla updates in place comes in
twice (`x_in` ... `x`), the two aliased by the launcher, and the kernel works on the output.
"""

from __future__ import annotations

import builtins
import os

import numpy as np
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner, Heuristics

from fla.ops.common import chunk_h as _fla_h
from fla.ops.gla import chunk as _fla_gla
from fla.ops.gsa import chunk_bwd as _fla_gsa_bwd
from fla.ops.gsa import chunk_fwd as _fla_gsa_fwd
from fla.ops.utils import cumsum as _fla_cumsum
from fla.ops.utils import softmax as _fla_softmax


def _body(kernel):
    """fla's kernel without its autotuner and heuristics wrappers: we pick every constant."""
    while isinstance(kernel, (Autotuner, Heuristics)):
        kernel = kernel.fn
    return kernel


def _interpreter_range(*bounds):
    """`range` for fla's kernels in Triton's interpreter: yields interpreter int32 scalars.

    Compiled, a loop variable over a runtime bound is an int32 value (fla calls `.to(tl.int64)`
    on it); the interpreter runs Python's `range` and hands out Python ints, which have no
    `.to`. Installed into fla's kernel modules only when TRITON_INTERPRET=1."""
    from triton.runtime.interpreter import TensorHandle

    def value(x):
        return int(np.asarray(x.handle.data).reshape(-1)[0]) if isinstance(x, tl.tensor) else int(x)

    for i in builtins.range(*(value(b) for b in bounds)):
        yield tl.tensor(TensorHandle(np.array([i], dtype=np.int32), tl.int32), tl.int32)


if os.environ.get("TRITON_INTERPRET") == "1":
    for _module in (_fla_h, _fla_gla, _fla_gsa_bwd, _fla_gsa_fwd, _fla_cumsum, _fla_softmax):
        _module.range = _interpreter_range


_cumsum = _body(_fla_cumsum.chunk_local_cumsum_vector_kernel)
_softmax_fwd = _body(_fla_softmax.softmax_fwd_kernel)
_softmax_bwd = _body(_fla_softmax.softmax_bwd_kernel)
_fwd_h = _body(_fla_h.chunk_fwd_kernel_h)
_bwd_dh = _body(_fla_h.chunk_bwd_kernel_dh)
_gsa_fwd_inter = _body(_fla_gsa_fwd.chunk_gsa_fwd_kernel_inter)
_gsa_fwd_intra = _body(_fla_gsa_fwd.chunk_gsa_fwd_kernel_intra)
_gla_A_inter = _body(_fla_gla.chunk_gla_fwd_A_kernel_intra_sub_inter)
_gla_A_intra = _body(_fla_gla.chunk_gla_fwd_A_kernel_intra_sub_intra)
_gla_o = _body(_fla_gla.chunk_gla_fwd_kernel_o)
_gla_bwd_dA = _body(_fla_gla.chunk_gla_bwd_kernel_dA)
_gla_bwd_dv = _body(_fla_gla.chunk_gla_bwd_kernel_dv)
_gla_bwd_intra = _body(_fla_gla.chunk_gla_bwd_kernel_intra)
_gla_bwd_inter = _body(_fla_gla.chunk_gla_bwd_kernel_inter)
_gsa_bwd_dA = _body(_fla_gsa_bwd.chunk_gsa_bwd_kernel_dA)
_gsa_bwd_dqkvg = _body(_fla_gsa_bwd.chunk_gsa_bwd_kernel_dqkvg)
_gsa_bwd_intra_dvg = _body(_fla_gsa_bwd.chunk_gsa_bwd_kernel_intra_dvg)


# Every chunk kernel takes the packed-row index arrays of fla's varlen mode as inputs: cu (the
# sequences' offsets, fla's cu_seqlens), ci (fla's chunk_indices: (sequence, chunk) per chunk)
# and, for the state passes, so (fla's split_offsets: each sequence's first chunk). With
# VARLEN false the kernels never read them (the launcher passes a one-element placeholder).


@triton.jit
def cumsum(s, cu, ci, scale, T, o, B: tl.constexpr, H: tl.constexpr, S: tl.constexpr,
           BT: tl.constexpr, BS: tl.constexpr, REVERSE: tl.constexpr, HAS_SCALE: tl.constexpr,
           VARLEN: tl.constexpr):
    """o = chunk-local (reverse) cumulative sum of s along T, times scale if HAS_SCALE."""
    _cumsum(s, o, scale, cu, ci, T, B, H, S, BT, BS, REVERSE, HAS_SCALE, VARLEN, False)


@triton.jit
def softmax_fwd(x, p, D: tl.constexpr, B: tl.constexpr):
    _softmax_fwd(x, p, D, B)


@triton.jit
def softmax_bwd(p, dp, ds, D: tl.constexpr, B: tl.constexpr):
    _softmax_bwd(p, dp, ds, D, B)


@triton.jit
def fwd_h(k, v, g, cu, so, T, h, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
          BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_GK: tl.constexpr,
          USE_GV: tl.constexpr, VARLEN: tl.constexpr):
    """Chunk-boundary states h [B, NT, H, K, V]; g is the key gate (USE_GK) or value gate."""
    _fwd_h(k, v, h, None, None, g, g, None, None, cu, so, T, H, K, V, BT, BT, BK, BV,
           False, False, USE_GK, USE_GV, False, False, VARLEN, False)


@triton.jit
def bwd_dh(q, g, do, cu, so, scale, T, dh, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
           BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_GK: tl.constexpr,
           USE_GV: tl.constexpr, VARLEN: tl.constexpr):
    """Gradients of the chunk-boundary states dh [B, NT, H, K, V] (no final-state gradient)."""
    _bwd_dh(q, None, None, g, g, do, dh, None, None, cu, so, scale, T, H, H, K, V, BT, BT,
            BK, BV, 1, False, False, USE_GK, USE_GV, False, False, VARLEN, False)


@triton.jit
def gsa_fwd_inter(q, k, h, g, cu, ci, scale, T, o, A, H: tl.constexpr, K: tl.constexpr,
                  V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  VARLEN: tl.constexpr):
    _gsa_fwd_inter(q, k, h, g, o, A, cu, ci, scale, T, H, K, V, BT, BK, BV, VARLEN)


@triton.jit
def gsa_fwd_intra(v, g, o_in, A, cu, ci, T, o, H: tl.constexpr, V: tl.constexpr,
                  BT: tl.constexpr, BC: tl.constexpr, BV: tl.constexpr, NC: tl.constexpr,
                  VARLEN: tl.constexpr):
    _gsa_fwd_intra(v, g, o, A, cu, ci, T, H, V, BT, BC, BV, NC, VARLEN)


@triton.jit
def gla_A_inter(q, k, g, cu, ci, scale, T, A, H: tl.constexpr, K: tl.constexpr,
                BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, NC: tl.constexpr,
                VARLEN: tl.constexpr):
    _gla_A_inter(q, k, g, A, cu, ci, scale, T, H, K, BT, BC, BK, NC, VARLEN)


@triton.jit
def gla_A_intra(q, k, g, A_in, cu, ci, scale, T, A, H: tl.constexpr, K: tl.constexpr,
                BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, VARLEN: tl.constexpr):
    _gla_A_intra(q, k, g, A, cu, ci, scale, T, H, K, BT, BC, BK, VARLEN)


@triton.jit
def gla_o(q, v, g, h, A, cu, ci, scale, T, o, H: tl.constexpr, K: tl.constexpr,
          V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
          VARLEN: tl.constexpr):
    _gla_o(q, v, g, h, o, A, cu, ci, scale, T, H, H, K, V, BT, BK, BV, False, VARLEN, False)


@triton.jit
def gla_bwd_dA(v, do, cu, ci, scale, T, dA, H: tl.constexpr, V: tl.constexpr,
               BT: tl.constexpr, BV: tl.constexpr, VARLEN: tl.constexpr):
    _gla_bwd_dA(v, do, dA, cu, ci, scale, T, H, V, BT, BV, VARLEN)


@triton.jit
def gla_bwd_dv(k, g, A, do, dh, cu, ci, T, dv, H: tl.constexpr, K: tl.constexpr,
               V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               VARLEN: tl.constexpr):
    _gla_bwd_dv(k, g, A, do, dh, dv, cu, ci, T, H, K, V, BT, BK, BV, VARLEN, False)


@triton.jit
def gla_bwd_intra(q, k, g, dA, cu, ci, T, dq, dk, H: tl.constexpr, K: tl.constexpr,
                  BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, NC: tl.constexpr,
                  VARLEN: tl.constexpr):
    _gla_bwd_intra(q, k, g, dA, dq, dk, cu, ci, T, H, K, BT, BC, BK, NC, VARLEN)


@triton.jit
def gla_bwd_inter(q, k, v, g, h, do, dh, dq, dk, cu, ci, scale, T, dq2, dk2, dg,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, VARLEN: tl.constexpr):
    _gla_bwd_inter(q, k, v, g, h, do, dh, dq, dk, dq2, dk2, dg, cu, ci, scale, T, H, K, V,
                   BT, BK, BV, VARLEN, False)


@triton.jit
def gsa_bwd_dA(v, g, do, cu, ci, scale, T, dA, B: tl.constexpr, H: tl.constexpr,
               V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BV: tl.constexpr,
               NC: tl.constexpr, VARLEN: tl.constexpr):
    _gsa_bwd_dA(v, g, do, dA, ci, cu, scale, T, B, H, V, BT, BC, BV, NC, VARLEN)


@triton.jit
def gsa_bwd_dqkvg(q, k, v, h, g, do, dh, dg, dA, cu, ci, scale, T, A, dq, dk, dv, dgv,
                  B: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                  BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, VARLEN: tl.constexpr):
    _gsa_bwd_dqkvg(q, k, v, h, g, A, do, dh, dq, dk, dv, dg, dgv, dA, cu, ci, scale, T, B, H,
                   K, V, BT, BK, BV, VARLEN)


@triton.jit
def gsa_bwd_intra_dvg(v, g, o, A, do, dv_in, cu, ci, T, dv, dg, H: tl.constexpr,
                      V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BV: tl.constexpr,
                      NC: tl.constexpr, VARLEN: tl.constexpr):
    _gsa_bwd_intra_dvg(v, g, o, A, do, dv, dg, cu, ci, T, H, V, BT, BC, BV, NC, VARLEN)

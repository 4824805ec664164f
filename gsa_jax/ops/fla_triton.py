"""The peer's chunked GSA (flash-linear-attention 0.6.0's Triton kernels) run from JAX.

`chunk_gsa(q, k, v, s, g)` computes what `fla.ops.gsa.chunk_gsa` computes, with fla's own
kernels, launched on JAX arrays in the same order, dtypes and block layout as fla's Python code
(`ChunkGSAFunction` with its default checkpoint_level 2: the backward recomputes the gate's
cumulative sum and the chunk states). It is an in-process GPU reference for our kernels (values
and gradients through `jax.grad`, no torch tensors, no copies between frameworks) and the peer's
row in `experiments/bench_kernels.py`.

    pass 1 (GLA gated on its value axis, the slots s):  hk = states(k, s, g);
            ok = q·hk + intra(q, k, s);  p = softmax(ok)
    pass 2 (GLA gated on its key axis, the slots s):    hv = states(s, v, g);
            o = p·hv + intra(p, s, v)

Launchers: "jax_triton" (`jax_triton.triton_call`, the GPU path: the optional `triton` extra,
i.e. jax-triton, flash-linear-attention, fla-core, triton) or "interpret" (Triton's interpreter
on the host through `jax.pure_callback`; TRITON_INTERPRET=1 must be set before fla is
imported; slow, for checking the wiring on a CPU). "auto" takes jax_triton on a GPU.

Packed rows: `cu_seqlens` (fla's varlen mode, B = 1). Not covered (fla has them, our callers
do not need them): initial and final states, slots M > 256 (fla's split-and-merge branch),
checkpoint levels 0 and 1.
Block sizes and warps are ours to choose (fla autotunes them): `DEFAULT_CONFIGS`, per launch
site, overridable with `configs={site: {...}}`; results do not depend on them beyond rounding.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

CHUNK = 64        # fla's chunk_gsa default chunk_size
SUB_CHUNK = 16    # fla's BC = min(16, BT)
RCP_LN2 = 1.4426950216  # fla.ops.utils.constant.RCP_LN2: fla keeps gate sums in log2 units

# Per launch site: block sizes (clipped to the dimension they tile), warps, pipeline stages.
# The sites whose block sizes fla fixes in Python (gsa_fwd_intra, gla_bwd_intra, gsa_bwd_*,
# gla_bwd_dA) take fla's values in the code below; only warps / stages are read for them.
_BLOCK = {"BK": 64, "BV": 64, "num_warps": 4, "num_stages": 2}
DEFAULT_CONFIGS: dict[str, dict[str, int]] = {
    "cumsum": {"BS": 32, "num_warps": 4, "num_stages": 3},
    "softmax": {"num_warps": 4, "num_stages": 3},
    "fwd_h_k": dict(_BLOCK), "fwd_h_v": dict(_BLOCK),
    "bwd_dh_k": dict(_BLOCK), "bwd_dh_v": dict(_BLOCK),
    "gsa_fwd_inter": dict(_BLOCK),
    "gsa_fwd_intra": {"num_warps": 4, "num_stages": 2},
    "gla_A_inter": {"BK": 64, "num_warps": 4, "num_stages": 2},
    "gla_A_intra": {"num_warps": 4, "num_stages": 2},
    "gla_o": dict(_BLOCK),
    "gla_bwd_dA": {"num_warps": 4, "num_stages": 2},
    "gla_bwd_dv": dict(_BLOCK),
    "gla_bwd_intra": {"num_warps": 4, "num_stages": 2},
    "gla_bwd_inter": dict(_BLOCK),
    "gsa_bwd_dA": {"num_warps": 4, "num_stages": 3},
    "gsa_bwd_dqkvg": {"num_warps": 4, "num_stages": 2},
    "gsa_bwd_intra_dvg": {"num_warps": 4, "num_stages": 2},
}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _fla_block(dim: int) -> int:
    """The block fla's Python code fixes (no autotuning) for a dimension it tiles:
    min(64, next power of two). One formula for the launches and the autotune keys."""
    return min(64, _pow2(dim))


def _whole_block(dim: int) -> int:
    """fla's block for a dimension a kernel loads whole (gla_A_intra's K <= 256)."""
    return max(_pow2(dim), 16)


def _block(want: int, dim: int) -> int:
    """A block of `want` (a power of two) no larger than the dimension needs, and >= 16 (tl.dot)."""
    return max(16, min(want, _pow2(dim)))


# ----------------------------------------------------------------------------- launchers

Launch = Callable[..., list]


def _kernels():
    from gsa_jax.ops import fla_triton_kernels
    return fla_triton_kernels


def _split_inputs(inputs):
    is_scalar = [isinstance(x, (bool, int, float)) for x in inputs]
    n = is_scalar.index(True) if True in is_scalar else len(inputs)
    if not all(is_scalar[n:]):
        raise ValueError("fla_triton: a launch takes its arrays first, then its scalars")
    return list(inputs[:n]), list(inputs[n:])


def _import_jax_triton():
    """jax_triton, imported without its side effect on the process: it sets TRITON_CACHE_DIR to
    "" at import, which would take the on-disk cache (and TRITON_CACHE_AUTOTUNING) away from
    every later Triton user in the process, the peer's torch runs included."""
    before = os.environ.get("TRITON_CACHE_DIR")
    import jax_triton
    if before is None:
        os.environ.pop("TRITON_CACHE_DIR", None)
    else:
        os.environ["TRITON_CACHE_DIR"] = before
    return jax_triton


def launch_jax_triton(kernel, grid, inputs, out_shapes, *, aliases=(), zeroed=(), num_warps=4,
                      num_stages=2, **constants):
    """One kernel launch through `jax_triton.triton_call` (GPU). `aliases`: (input index,
    output index) pairs of buffers the kernel updates in place; `zeroed`: outputs that start
    as zeros (fla allocates them with torch.zeros); the others start uninitialised, as fla's
    `torch.empty` ones do."""
    jax_triton = _import_jax_triton()
    arrays, scalars = _split_inputs(inputs)
    # jax_triton types a Python float as fp64; fla's `scale` parameters are fp32.
    scalars = [np.float32(x) if isinstance(x, float) else x for x in scalars]
    out = jax_triton.triton_call(
        *arrays, *scalars, kernel=kernel, out_shape=list(out_shapes), grid=grid,
        input_output_aliases=dict(aliases), zeroed_outputs=tuple(zeroed),
        num_warps=num_warps, num_stages=num_stages, **constants)
    return list(out)


def _to_torch(a):
    import torch
    a = np.ascontiguousarray(a)
    if a.dtype == jnp.bfloat16:
        return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def _from_torch(t, dtype):
    import torch
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(jnp.bfloat16)
    return t.numpy().astype(dtype, copy=False)


def launch_interpret(kernel, grid, inputs, out_shapes, *, aliases=(), zeroed=(), num_warps=4,
                     num_stages=2, **constants):
    """One kernel launch in Triton's interpreter on the host (CPU tests of the wiring).

    Outputs that start uninitialised on the GPU (neither aliased nor in `zeroed`) start as NaN
    here (integers: -1): whatever reads a region its kernel did not write shows up as NaN
    instead of passing on a lucky zero."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("fla_triton launch='interpret' needs TRITON_INTERPRET=1 set before "
                           "fla and gsa_jax.ops.fla_triton_kernels are imported")
    arrays, scalars = _split_inputs(inputs)
    del num_warps, num_stages  # the interpreter runs one program at a time

    def host(*arrs):
        import torch
        ins = [_to_torch(a) for a in arrs]
        outs = []
        for j, o in enumerate(out_shapes):
            dtype = _to_torch(np.zeros((), o.dtype)).dtype
            fill = 0 if j in zeroed else (float("nan") if dtype.is_floating_point else -1)
            outs.append(torch.full(o.shape, fill, dtype=dtype))
        for i, j in aliases:
            outs[j].copy_(ins[i])
        kernel[tuple(grid)](*ins, *scalars, *outs, **constants)
        return [_from_torch(t, o.dtype) for t, o in zip(outs, out_shapes)]

    shapes = [jax.ShapeDtypeStruct(o.shape, o.dtype) for o in out_shapes]
    return list(jax.pure_callback(host, shapes, *arrays))


def _resolve_launch(launch) -> Launch:
    if callable(launch):
        return launch
    if launch == "auto":
        launch = "jax_triton" if jax.default_backend() == "gpu" else "interpret"
    if launch == "jax_triton":
        return launch_jax_triton
    if launch == "interpret":
        return launch_interpret
    raise ValueError(f"fla_triton: launch must be 'auto', 'jax_triton', 'interpret' or a "
                     f"callable, got {launch!r}")


def available() -> tuple[bool, str]:
    """(True, "") when the GPU path can run here, else (False, why)."""
    if jax.default_backend() != "gpu":
        return False, f"needs a GPU (JAX backend is {jax.default_backend()})"
    for module, load in (("jax_triton", _import_jax_triton), ("triton", None), ("fla", None)):
        try:
            load() if load else __import__(module)
        except Exception as e:  # noqa: BLE001 - any import failure means not available
            return False, f"cannot import {module}: {type(e).__name__}: {e}"
    return True, ""


def _autotune_sites(B: int, H: int, K: int, V: int, M: int, varlen: bool = False) -> dict:
    """site -> (fla module, kernel name, the autotune key values fla's code passes at it)."""
    BT, f = CHUNK, False
    return {
        "cumsum": ("fla.ops.utils.cumsum", "chunk_local_cumsum_vector_kernel",
                   dict(B=B, H=H, S=M, BT=BT, IS_VARLEN=varlen, REVERSE=f)),
        "softmax": ("fla.ops.utils.softmax", "softmax_fwd_kernel", dict(D=M)),
        "fwd_h_k": ("fla.ops.common.chunk_h", "chunk_fwd_kernel_h",
                    dict(BT=BT, USE_G=f, USE_GK=f, USE_GV=True, STATE_V_FIRST=f, K=K, V=M)),
        "fwd_h_v": ("fla.ops.common.chunk_h", "chunk_fwd_kernel_h",
                    dict(BT=BT, USE_G=f, USE_GK=True, USE_GV=f, STATE_V_FIRST=f, K=M, V=V)),
        "bwd_dh_k": ("fla.ops.common.chunk_h", "chunk_bwd_kernel_dh",
                     dict(BT=BT, USE_G=f, USE_GK=f, USE_GV=True, STATE_V_FIRST=f, K=K, V=M)),
        "bwd_dh_v": ("fla.ops.common.chunk_h", "chunk_bwd_kernel_dh",
                     dict(BT=BT, USE_G=f, USE_GK=True, USE_GV=f, STATE_V_FIRST=f, K=M, V=V)),
        "gsa_fwd_inter": ("fla.ops.gsa.chunk_fwd", "chunk_gsa_fwd_kernel_inter",
                          dict(H=H, K=K, V=M, BT=BT, IS_VARLEN=varlen)),
        "gla_A_inter": ("fla.ops.gla.chunk", "chunk_gla_fwd_A_kernel_intra_sub_inter",
                        dict(BC=SUB_CHUNK)),
        "gla_A_intra": ("fla.ops.gla.chunk", "chunk_gla_fwd_A_kernel_intra_sub_intra",
                        dict(BK=_whole_block(M), BT=BT)),
        "gla_o": ("fla.ops.gla.chunk", "chunk_gla_fwd_kernel_o",
                  dict(BT=BT, HV=H, STATE_V_FIRST=f, K=M, V=V)),
        "gla_bwd_dA": ("fla.ops.gla.chunk", "chunk_gla_bwd_kernel_dA",
                       dict(BV=_fla_block(V), BT=BT)),
        "gla_bwd_dv": ("fla.ops.gla.chunk", "chunk_gla_bwd_kernel_dv",
                       dict(BT=BT, STATE_V_FIRST=f, K=M, V=V)),
        "gla_bwd_intra": ("fla.ops.gla.chunk", "chunk_gla_bwd_kernel_intra",
                          dict(BK=_fla_block(M), NC=CHUNK // SUB_CHUNK, BT=BT)),
        "gla_bwd_inter": ("fla.ops.gla.chunk", "chunk_gla_bwd_kernel_inter",
                          dict(BT=BT, STATE_V_FIRST=f, K=M, V=V)),
        "gsa_bwd_dA": ("fla.ops.gsa.chunk_bwd", "chunk_gsa_bwd_kernel_dA",
                       dict(H=H, V=M, BT=BT, IS_VARLEN=varlen)),
        "gsa_bwd_dqkvg": ("fla.ops.gsa.chunk_bwd", "chunk_gsa_bwd_kernel_dqkvg",
                          dict(H=H, K=K, V=M, BT=BT, IS_VARLEN=varlen)),
    }


def tuned_configs(B: int, H: int, K: int, V: int, M: int,
                  varlen: bool = False) -> dict[str, dict[str, int]]:
    """The configs fla's autotuners chose in this process for `chunk_gsa` at this shape.

    After fla's own `chunk_gsa` ran forward and backward here (through torch, as the peer row of
    bench_kernels does), each of its autotuners caches its pick under a key of the values it
    names (then the tensors' dtypes). Returned as `configs=` for `chunk_gsa`, so that the JAX
    launch runs the peer's kernels with the peer's own choices; sites with no cached pick are
    left out (DEFAULT_CONFIGS then). varlen: the picks of packed rows (fla keys them apart).
    Where one site has picks for several dtypes (the state
    pass runs in bf16 and, in the backward, float32), the first cached is taken."""
    import importlib

    from triton.runtime.autotuner import Autotuner, Heuristics

    out = {}
    for site, (module, name, want) in _autotune_sites(B, H, K, V, M, varlen).items():
        kernel = getattr(importlib.import_module(module), name)
        while isinstance(kernel, Heuristics):
            kernel = kernel.fn
        if not isinstance(kernel, Autotuner):
            continue
        keys = list(kernel.keys)
        for key, config in kernel.cache.items():
            named = dict(zip(keys, key))
            if all(named.get(k) == v for k, v in want.items()):
                out[site] = {**{k: v for k, v in config.kwargs.items() if k in ("BK", "BV", "BS")},
                             "num_warps": config.num_warps, "num_stages": config.num_stages}
                break
    return out


# ----------------------------------------------------------------------------- the op

class _Sites:
    """Launch helper: merges a site's config into the call and hands it to the launcher, and
    carries the row layout (`rows`: equal rows or packed sequences) every chunk kernel needs."""

    def __init__(self, launch: Launch, configs: Mapping[str, Mapping[str, int]], rows: "_Rows"):
        self.launch, self.configs, self.rows = launch, configs, rows

    def cfg(self, site: str) -> dict:
        return {**DEFAULT_CONFIGS[site], **dict(self.configs.get(site, {}))}

    def __call__(self, site, kernel, grid, inputs, outs, *, aliases=(), zeroed=(), **constants):
        c = self.cfg(site)
        return self.launch(kernel, grid, inputs, outs, aliases=aliases, zeroed=zeroed,
                           num_warps=c["num_warps"], num_stages=c["num_stages"], **constants)


class _Rows:
    """Where the chunks are. Equal rows: B rows of T, NT = ceil(T / 64) chunks each. Packed
    (fla's varlen mode, B = 1): the sequences between consecutive `cu_seqlens`, each chunked
    from its own start; NT counts the chunks of all of them (the grids' chunk axis), `ci` lists
    (sequence, chunk) per chunk and `so` each sequence's first chunk, as fla's
    prepare_chunk_indices / prepare_chunk_offsets make them."""

    def __init__(self, B: int, T: int, cu_seqlens: Optional[tuple]):
        self.varlen = cu_seqlens is not None
        if not self.varlen:
            self.N, self.NT = B, _cdiv(T, CHUNK)
            placeholder = jnp.zeros((1,), jnp.int32)
            self.cu = self.ci = self.so = placeholder
            return
        lens = np.diff(np.asarray(cu_seqlens))
        chunks = -(-lens // CHUNK)
        ci = [(n, c) for n in range(len(lens)) for c in range(chunks[n])]
        self.N, self.NT = len(lens), len(ci)
        self.cu = jnp.asarray(cu_seqlens, jnp.int32)
        self.ci = jnp.asarray(np.asarray(ci, np.int32).reshape(-1, 2))
        self.so = jnp.asarray(np.concatenate([[0], np.cumsum(chunks)]).astype(np.int32))


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def _cumsum(L: _Sites, x: Array, *, reverse: bool, scale: Optional[float]) -> Array:
    """fla's chunk_local_cumsum (vector form): float32, chunk-local, optionally reversed/scaled."""
    kern, R = _kernels(), L.rows
    B, T, H, S = x.shape
    BS = _block(L.cfg("cumsum")["BS"], S)
    grid = (_cdiv(S, BS) * R.NT, B * H)
    (o,) = L("cumsum", kern.cumsum, grid,
             [x, R.cu, R.ci, 1.0 if scale is None else float(scale), T],
             [_sds(x.shape, jnp.float32)], B=B, H=H, S=S, BT=CHUNK, BS=BS, REVERSE=reverse,
             HAS_SCALE=scale is not None, VARLEN=R.varlen)
    return o


def _states(L: _Sites, k: Array, v: Array, gc: Array, *, key_gate: bool, dtype) -> Array:
    """fla's chunk_fwd_h: the state before each chunk, [B, NT, H, K, V]; gc gates the key
    (pass 2's slots) or the value (pass 1's slots) dimension."""
    kern, R = _kernels(), L.rows
    B, T, H, K = k.shape
    V = v.shape[-1]
    site = "fwd_h_v" if key_gate else "fwd_h_k"
    c = L.cfg(site)
    BK, BV = _block(c["BK"], K), _block(c["BV"], V)
    grid = (_cdiv(K, BK) * _cdiv(V, BV) * R.N * H,)
    (h,) = L(site, kern.fwd_h, grid, [k, v, gc, R.cu, R.so, T],
             [_sds((B, R.NT, H, K, V), dtype)], H=H, K=K, V=V, BT=CHUNK, BK=BK, BV=BV,
             USE_GK=key_gate, USE_GV=not key_gate, VARLEN=R.varlen)
    return h


def _dstates(L: _Sites, q: Array, gc: Array, do: Array, scale: float, *, K: int,
             key_gate: bool) -> Array:
    """fla's chunk_bwd_dh in float32 (states_in_fp32=True): [B, NT, H, K, V]."""
    kern, R = _kernels(), L.rows
    B, T, H, V = do.shape
    site = "bwd_dh_v" if key_gate else "bwd_dh_k"
    c = L.cfg(site)
    BK, BV = _block(c["BK"], K), _block(c["BV"], V)
    grid = (_cdiv(K, BK) * _cdiv(V, BV) * R.N * H,)
    (dh,) = L(site, kern.bwd_dh, grid, [q, gc, do, R.cu, R.so, float(scale), T],
              [_sds((B, R.NT, H, K, V), jnp.float32)], H=H, K=K, V=V, BT=CHUNK,
              BK=BK, BV=BV, USE_GK=key_gate, USE_GV=not key_gate, VARLEN=R.varlen)
    return dh


def _softmax(L: _Sites, x: Array) -> Array:
    kern = _kernels()
    D = x.shape[-1]
    rows = x.reshape(-1, D)
    (p,) = L("softmax", kern.softmax_fwd, (rows.shape[0],), [rows],
             [_sds(rows.shape, jnp.float32)], D=D, B=_pow2(D))
    return p.reshape(x.shape)


def _softmax_grad(L: _Sites, p: Array, dp: Array, dtype) -> Array:
    kern = _kernels()
    D = p.shape[-1]
    (ds,) = L("softmax", kern.softmax_bwd, (p.size // D,), [p.reshape(-1, D), dp.reshape(-1, D)],
              [_sds((p.size // D, D), dtype)], D=D, B=_pow2(D))
    return ds.reshape(p.shape)


def _sum_blocks(x: Array) -> Array:
    """fla's `x.sum(0, dtype=x.dtype)` over the block axis: float32 accumulation, one rounding."""
    if x.shape[0] == 1:
        return x[0]
    return jnp.sum(x.astype(jnp.float32), axis=0).astype(x.dtype)


def _prologue(L: _Sites, k, v, s, g):
    """What the forward and the backward both start with: the kernels, the row layout, the
    sizes (B, T, H, K, V, M), fla's gate cumsum (float32, log2 units; the backward recomputes
    it, checkpoint level 2) and the VARLEN flag every chunk kernel takes."""
    B, T, H, K = k.shape
    gc = _cumsum(L, g, reverse=False, scale=RCP_LN2)
    return (_kernels(), L.rows, (B, T, H, K, v.shape[-1], s.shape[-1]), gc,
            dict(VARLEN=L.rows.varlen))


def _forward(L: _Sites, q, k, v, s, g, scale):
    kern, R, (B, T, H, K, V, M), gc, idx = _prologue(L, k, v, s, g)
    NT, NC, BC = R.NT, CHUNK // SUB_CHUNK, SUB_CHUNK

    # Pass 1: fla's chunk_gsa_fwd_k(q, k, v=s, g).
    hk = _states(L, k, s, gc, key_gate=False, dtype=k.dtype)
    c = L.cfg("gsa_fwd_inter")
    BK, BV = _block(c["BK"], K), _block(c["BV"], M)
    ok, A1 = L("gsa_fwd_inter", kern.gsa_fwd_inter, (_cdiv(M, BV) * NT, B * H),
               [q, k, hk, gc, R.cu, R.ci, float(scale), T],
               [_sds((B, T, H, M), s.dtype), _sds((B, T, H, CHUNK), q.dtype)],
               H=H, K=K, V=M, BT=CHUNK, BK=BK, BV=BV, **idx)
    BV = _fla_block(M)
    (ok,) = L("gsa_fwd_intra", kern.gsa_fwd_intra, (_cdiv(M, BV) * NT * NC, B * H),
              [s, gc, ok, A1, R.cu, R.ci, T], [_sds(ok.shape, ok.dtype)], aliases=((2, 0),),
              H=H, V=M, BT=CHUNK, BC=BC, BV=BV, NC=NC, **idx)
    p = _softmax(L, ok)
    qv = p.astype(q.dtype)

    # Pass 2: fla's chunk_gla_fwd(q=qv, k=s, v, g_cumsum=gc, scale=1).
    hv = _states(L, s, v, gc, key_gate=True, dtype=s.dtype)
    c = L.cfg("gla_A_inter")
    (Av,) = L("gla_A_inter", kern.gla_A_inter, (NT, NC * NC, B * H),
              [qv, s, gc, R.cu, R.ci, 1.0, T], [_sds((B, T, H, CHUNK), jnp.float32)],
              H=H, K=M, BT=CHUNK, BC=BC, BK=_block(c["BK"], M), NC=NC, **idx)
    (Av,) = L("gla_A_intra", kern.gla_A_intra, (NT, NC, B * H),
              [qv, s, gc, Av, R.cu, R.ci, 1.0, T], [_sds(Av.shape, Av.dtype)],
              aliases=((3, 0),), H=H, K=M, BT=CHUNK, BC=BC, BK=_whole_block(M), **idx)
    c = L.cfg("gla_o")
    BK, BV = _block(c["BK"], M), _block(c["BV"], V)
    (o,) = L("gla_o", kern.gla_o, (_cdiv(V, BV) * NT, B * H),
             [qv, v, gc, hv, Av, R.cu, R.ci, 1.0, T], [_sds(v.shape, v.dtype)], zeroed=(0,),
             H=H, K=M, V=V, BT=CHUNK, BK=BK, BV=BV, **idx)
    return o, (ok, p, Av)


def _backward(L: _Sites, q, k, v, s, g, scale, ok, p, Av, do):
    kern, R, (B, T, H, K, V, M), gc, idx = _prologue(L, k, v, s, g)
    NT, NC, BC = R.NT, CHUNK // SUB_CHUNK, SUB_CHUNK
    qv = p.astype(q.dtype)
    f32 = jnp.float32

    # Pass 2 backward: fla's chunk_gla_bwd(q=qv, k=s, v, g_cumsum=gc, scale=1, h=None, A=Av).
    hv = _states(L, s, v, gc, key_gate=True, dtype=f32)
    dhv = _dstates(L, qv, gc, do, 1.0, K=M, key_gate=True)
    c = L.cfg("gla_bwd_dv")
    BK, BV = _block(c["BK"], M), _block(c["BV"], V)
    (dv,) = L("gla_bwd_dv", kern.gla_bwd_dv, (_cdiv(V, BV) * NT, B * H),
              [s, gc, Av, do, dhv, R.cu, R.ci, T], [_sds(do.shape, do.dtype)],
              H=H, K=M, V=V, BT=CHUNK, BK=BK, BV=BV, **idx)
    (dA,) = L("gla_bwd_dA", kern.gla_bwd_dA, (NT, B * H), [v, do, R.cu, R.ci, 1.0, T],
              [_sds((B, T, H, CHUNK), f32)], H=H, V=V, BT=CHUNK, BV=_fla_block(V), **idx)
    BK = _fla_block(M)
    dqv, dsv = L("gla_bwd_intra", kern.gla_bwd_intra, (_cdiv(M, BK) * NC * NT, B * H),
                 [qv, s, gc, dA, R.cu, R.ci, T], [_sds(s.shape, f32), _sds(s.shape, f32)],
                 H=H, K=M, BT=CHUNK, BC=BC, BK=BK, NC=NC, **idx)
    c = L.cfg("gla_bwd_inter")
    BK, BV = _block(c["BK"], M), _block(c["BV"], V)
    dqv, dsv, dg = L("gla_bwd_inter", kern.gla_bwd_inter, (_cdiv(M, BK) * NT, B * H),
                     [qv, s, v, gc, hv, do, dhv, dqv, dsv, R.cu, R.ci, 1.0, T],
                     [_sds(s.shape, f32)] * 3, H=H, K=M, V=V, BT=CHUNK, BK=BK, BV=BV, **idx)

    dok = _softmax_grad(L, p, dqv, ok.dtype)

    # Pass 1 backward: fla's chunk_gsa_bwd_k(q, k, v=s, g=gc, h=None, o=ok, do=dok, dg).
    hk = _states(L, k, s, gc, key_gate=False, dtype=k.dtype)
    dhk = _dstates(L, q, gc, dok, scale, K=K, key_gate=False)
    BK, BV = _fla_block(K), _fla_block(M)
    NK, NV = _cdiv(K, BK), _cdiv(M, BV)
    (dA,) = L("gsa_bwd_dA", kern.gsa_bwd_dA, (NV * NT * NC * NC, B * H),
              [s, gc, dok, R.cu, R.ci, float(scale), T], [_sds((NV, B, T, H, CHUNK), q.dtype)],
              B=B, H=H, V=M, BT=CHUNK, BC=BC, BV=BV, NC=NC, **idx)
    dA = _sum_blocks(dA)
    A, dq, dk, dsk, dgv = L(
        "gsa_bwd_dqkvg", kern.gsa_bwd_dqkvg, (NK * NT, B * H),
        [q, k, s, hk, gc, dok, dhk, dg, dA, R.cu, R.ci, float(scale), T],
        [_sds((NK, B, T, H, CHUNK), dok.dtype), _sds(q.shape, q.dtype), _sds(k.shape, k.dtype),
         _sds((NK,) + s.shape, s.dtype), _sds((NK,) + s.shape, f32)],
        B=B, H=H, K=K, V=M, BT=CHUNK, BK=BK, BV=BV, **idx)
    A, dsk, dgv = _sum_blocks(A), _sum_blocks(dsk), _sum_blocks(dgv)
    dsk, dg = L("gsa_bwd_intra_dvg", kern.gsa_bwd_intra_dvg, (NV * NT * NC, B * H),
                [s, gc, ok, A, dok, dsk, R.cu, R.ci, T],
                [_sds(dsk.shape, dsk.dtype), _sds(s.shape, f32)],
                aliases=((5, 0),), H=H, V=M, BT=CHUNK, BC=BC, BV=BV, NC=NC, **idx)
    dg = dgv + _cumsum(L, dg, reverse=True, scale=None)
    ds = dsv + dsk.astype(f32)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), ds.astype(s.dtype),
            dg.astype(s.dtype).astype(g.dtype))


def _sites(launch, configs, B, T, cu_seqlens) -> _Sites:
    return _Sites(launch, dict(configs), _Rows(B, T, cu_seqlens))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _chunk_gsa(q, k, v, s, g, scale, launch, configs, cu_seqlens):
    L = _sites(launch, configs, q.shape[0], q.shape[1], cu_seqlens)
    return _forward(L, q, k, v, s, g, scale)[0]


def _chunk_gsa_fwd(q, k, v, s, g, scale, launch, configs, cu_seqlens):
    L = _sites(launch, configs, q.shape[0], q.shape[1], cu_seqlens)
    o, (ok, p, Av) = _forward(L, q, k, v, s, g, scale)
    return o, (q, k, v, s, g, ok, p, Av)


def _chunk_gsa_bwd(scale, launch, configs, cu_seqlens, res, do):
    q, k, v, s, g, ok, p, Av = res
    L = _sites(launch, configs, q.shape[0], q.shape[1], cu_seqlens)
    return _backward(L, q, k, v, s, g, scale, ok, p, Av, do.astype(v.dtype))


_chunk_gsa.defvjp(_chunk_gsa_fwd, _chunk_gsa_bwd)


def _freeze(configs: Optional[Mapping[str, Mapping[str, int]]]) -> tuple:
    configs = dict(configs or {})
    unknown = sorted(set(configs) - set(DEFAULT_CONFIGS))
    if unknown:
        raise ValueError(f"fla_triton: unknown launch sites {unknown}; known: "
                         f"{sorted(DEFAULT_CONFIGS)}")
    return tuple(sorted((site, tuple(sorted(dict(c).items()))) for site, c in configs.items()))


def chunk_gsa(q: Array, k: Array, v: Array, s: Array, g: Array, scale: Optional[float] = None,
              *, cu_seqlens: Optional[Any] = None, launch: Any = "auto",
              configs: Optional[Mapping[str, Mapping[str, int]]] = None) -> Array:
    """GSA output through fla 0.6.0's chunked Triton kernels (differentiable).

    Args:
      q: [B, T, HQ, K]; k: [B, T, H, K]; v: [B, T, H, V]; s, g: [B, T, H, M] with HQ a multiple
        of H (fla repeats k, v, s, g over the query groups; so do we, and gradients sum back).
      scale: multiplies q·k in pass 1; None means K ** -0.5 (fla's default, and ours).
      cu_seqlens: packed sequences in one row (B = 1): the N + 1 offsets 0 = c_0 < c_1 < ...
        < c_N = T of N sequences, each starting from a zero state (fla's cu_seqlens; our
        segment_ids give the same); host integers (a list, tuple or NumPy array), not traced.
      launch: "auto", "jax_triton", "interpret" or a callable with `launch_jax_triton`'s
        signature.
      configs: {site: {"BK", "BV", "BS", "num_warps", "num_stages"}} overrides of
        DEFAULT_CONFIGS.
    Returns:
      o [B, T, HQ, V] in v's dtype (fla's), equal to
      o_t = softmax(q_t·Hk_t) Hv_t with Hk_t = diag(exp g_t) Hk_{t-1} (as [M, K]) + s_t k_t^T,
      Hv_t = diag(exp g_t) Hv_{t-1} + s_t v_t^T, starting from zero states.
    """
    shapes = [x.shape for x in (q, k, v, s, g)]
    if any(len(x) != 4 for x in shapes):
        raise ValueError(f"fla_triton.chunk_gsa: q, k, v, s, g must be [B, T, H, D], got {shapes}")
    B, T, HQ, K = q.shape
    H = k.shape[2]
    if (k.shape[:2] != (B, T) or v.shape[:3] != (B, T, H) or s.shape[:3] != (B, T, H)
            or g.shape != s.shape or k.shape[3] != K):
        raise ValueError(f"fla_triton.chunk_gsa: inconsistent shapes q {q.shape}, k {k.shape}, "
                         f"v {v.shape}, s {s.shape}, g {g.shape}")
    if HQ % H:
        raise ValueError(f"fla_triton.chunk_gsa: query heads {HQ} not a multiple of {H}")
    if s.shape[-1] > 256:
        raise ValueError(f"fla_triton.chunk_gsa: M = {s.shape[-1]} > 256 slots is fla's "
                         "split-and-merge branch, not wired here")
    if T == 0:
        raise ValueError("fla_triton.chunk_gsa: T = 0")
    cu = _check_cu_seqlens(cu_seqlens, B, T)
    if HQ != H:
        k, v, s, g = (jnp.repeat(x, HQ // H, axis=2) for x in (k, v, s, g))
    scale = K ** -0.5 if scale is None else float(scale)
    return _chunk_gsa(q, k, v, s, g, scale, _resolve_launch(launch), _freeze(configs), cu)


def _check_cu_seqlens(cu_seqlens, B: int, T: int) -> Optional[tuple]:
    if cu_seqlens is None:
        return None
    if isinstance(cu_seqlens, jax.core.Tracer):
        raise ValueError("fla_triton.chunk_gsa: cu_seqlens must be host integers (the grids "
                         "depend on them), not a traced array")
    cu = np.asarray(cu_seqlens)
    if cu.ndim != 1 or cu.size < 2 or not np.issubdtype(cu.dtype, np.integer):
        raise ValueError(f"fla_triton.chunk_gsa: cu_seqlens must be N + 1 >= 2 integers, got "
                         f"{cu_seqlens!r}")
    if B != 1:
        raise ValueError(f"fla_triton.chunk_gsa: packed sequences (cu_seqlens) need B = 1, "
                         f"got B = {B} (fla's rule too)")
    if cu[0] != 0 or cu[-1] != T or np.any(np.diff(cu) <= 0):
        raise ValueError(f"fla_triton.chunk_gsa: cu_seqlens must rise strictly from 0 to T = "
                         f"{T}, got {cu.tolist()}")
    return tuple(int(c) for c in cu)


__all__ = ["chunk_gsa", "available", "launch_jax_triton", "launch_interpret", "tuned_configs",
           "DEFAULT_CONFIGS"]

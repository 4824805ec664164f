"""The Pallas form of GLA and GSA: GPU kernels with a safe fallback for extreme gates.

The kernels (`pallas_kernels`) factor the intra-chunk decays through the chunk's midpoint, which
is exact but needs every chunk's accumulated gate |Σ_chunk g| ≤ MAX_CHUNK_DECAY (120: per-step
decays above e^{-120/C}, about 0.15 per step at C = 64). Inputs with stronger gates take the
pure-JAX chunk form instead (sub-chunk references, safe for any gate), chosen at run time by
`lax.cond`. That branch is rematerialised and mapped over heads, so it adds little memory to the
common path; it is slower, and a model whose gates live there should use a smaller chunk_size.

On a backend without a GPU the kernels run in Pallas' interpreter (slow; for tests).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from gsa_jax.ops.chunk import gla_chunk

KERNEL_DIMS = (16, 32, 64, 128, 256)


def kernel_supports(*dims: int, chunk_size: int) -> bool:
    """True where the kernels handle these feature dims and chunk size (powers of two)."""
    return all(d in KERNEL_DIMS for d in dims) and chunk_size in (16, 32, 64, 128)


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _chunk_decay_exceeds(g: jax.Array, chunk_size: int, limit: float) -> jax.Array:
    """Whether any chunk of any channel accumulates a gate below −limit. g: [B, T, H, D]."""
    B, T, H, D = g.shape
    Tp = -(-T // chunk_size) * chunk_size
    g = jnp.pad(g.astype(jnp.float32), ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
    totals = g.reshape(B, Tp // chunk_size, chunk_size, H, D).sum(axis=2)
    return jnp.any(totals < -limit)


def _fallback(q, k, v, g, state, runs, *, gate_axis, scale, chunk_size):
    """Pure-JAX chunk form, one (batch, head) slice at a time under remat (bounded memory).

    Takes the kernel's layout: q [B,T,H,K], k/v/g with H heads already repeated, state
    [B,H,K,V]; returns (o, final state) like the kernel.
    """
    B, T, H, _ = q.shape

    def one(xs):
        qi, ki, vi, gi, si, ri = xs
        o, s = gla_chunk(qi[None, :, None], ki[None, :, None], vi[None, :, None],
                         gi[None, :, None], gate_axis=gate_axis, scale=scale,
                         initial_state=si[None, None],
                         runs=None if ri is None else ri[None], chunk_size=chunk_size)
        return o[0, :, 0], s[0, 0]

    def by_head(x):  # [B, T, H, D] -> [B·H, T, D]
        return x.transpose(0, 2, 1, 3).reshape(B * H, T, x.shape[-1])

    r = None if runs is None else jnp.repeat(runs, H, axis=0)
    xs = (by_head(q), by_head(k), by_head(v), by_head(g), state.reshape((B * H,) + state.shape[2:]), r)
    o, s = jax.lax.map(jax.checkpoint(one), xs, batch_size=max(1, min(8, B * H)))
    o = o.reshape(B, H, T, -1).transpose(0, 2, 1, 3)
    return o, s.reshape(state.shape)


# Benchmarks set this to False to time the kernels without the gate check and its lax.cond
# (whose predicate XLA reads back on the host). Inputs that break the bound then give garbage.
CHECK_GATES = True


def _dispatch(g, chunk_size, kernel_fn, fallback_fn, *operands):
    """kernel_fn(*operands), or fallback_fn(*operands) where a chunk's gate is too strong."""
    from pallas_kernels.gla import MAX_CHUNK_DECAY

    if not CHECK_GATES:
        return kernel_fn(*operands)
    extreme = _chunk_decay_exceeds(g, chunk_size, MAX_CHUNK_DECAY)
    return jax.lax.cond(extreme, fallback_fn, kernel_fn, *operands)


def _kernel_pass(q, k, v, g, state, runs, *, gate_axis, scale, chunk_size, out_dtype,
                 recompute_states, interpret):
    from pallas_kernels.gla import gla_chunk_pallas

    if interpret is None:
        interpret = not on_gpu()
    o, s = gla_chunk_pallas(q, k, v, g, state, runs, key_gated=gate_axis == "key", scale=scale,
                            chunk_size=chunk_size, out_dtype=out_dtype,
                            recompute_states=recompute_states, interpret=interpret)
    return o.astype(out_dtype), s


def _fallback_pass(q, k, v, g, state, runs, *, gate_axis, scale, chunk_size, out_dtype,
                   **unused):
    groups = q.shape[2] // k.shape[2]
    k, v, g = (jnp.repeat(x, groups, axis=2) for x in (k, v, g))
    f32 = jnp.promote_types(q.dtype, jnp.float32)
    o, s = _fallback(q.astype(f32), k.astype(f32), v.astype(f32), g.astype(f32),
                     state.astype(f32), runs, gate_axis=gate_axis, scale=scale,
                     chunk_size=chunk_size)
    return o.astype(out_dtype), s.astype(jnp.float32)


def gla_pallas(q, k, v, g, initial_state, runs: Optional[jax.Array], *, gate_axis: str,
               scale: float, chunk_size: int, out_dtype=None, recompute_states: bool = False,
               interpret: Optional[bool] = None):
    """GLA by the kernels, or by the safe fallback where a chunk's gate is too strong.

    Args as `pallas_kernels.gla.gla_chunk_pallas` (initial_state per query head, [B, H, K, V]).
    Returns (o [B, T, H, V], final state [B, H, K, V] f32).
    """
    kw = dict(gate_axis=gate_axis, scale=scale, chunk_size=chunk_size,
              out_dtype=jnp.dtype(out_dtype or q.dtype), recompute_states=recompute_states,
              interpret=interpret)

    def run(pass_fn):
        return lambda q, k, v, g, state: pass_fn(q, k, v, g, state, runs, **kw)

    return _dispatch(g, chunk_size, run(_kernel_pass), run(_fallback_pass), q, k, v, g,
                     initial_state)


def gsa_pallas(q, k, v, s, g, hk0, hv0, runs, *, scale: float, chunk_size: int,
               slot_activation_fn, recompute_states: bool = False,
               interpret: Optional[bool] = None):
    """GSA's two passes by the kernels (or both by the fallback); states per query head.

    Returns (o [B, T, H, V] in q's dtype, Hk [B, H, K, M] f32, Hv [B, H, M, V] f32).
    """
    kw = dict(chunk_size=chunk_size, recompute_states=recompute_states, interpret=interpret)

    def run(pass_fn):
        def both(q, k, v, s, g, hk0, hv0):
            z, hk = pass_fn(q, k, s, g, hk0, runs, gate_axis="value", scale=scale,
                            out_dtype=jnp.dtype(jnp.float32), **kw)
            p = slot_activation_fn(z).astype(q.dtype)
            o, hv = pass_fn(p, s, v, g, hv0, runs, gate_axis="key", scale=1.0,
                            out_dtype=jnp.dtype(q.dtype), **kw)
            return o, hk, hv
        return both

    return _dispatch(g, chunk_size, run(_kernel_pass), run(_fallback_pass), q, k, v, s, g,
                     hk0, hv0)

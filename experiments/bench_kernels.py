"""Benchmark of the GSA Pallas kernels against the pure-JAX chunk form, cuDNN attention and the peer.

For each shape (B, T, H, K=V, M) at a fixed token count it reports the median time of the forward
and of forward+backward, and the memory of forward+backward, for:
  pallas        gated_slot_attention(impl="pallas"), chunk states kept for the backward pass
  pallas_recomp the same with recompute_states=True (the paper's hidden-state recomputation)
  chunk         the pure-JAX chunk form (impl="chunk")
  cudnn_attn    causal softmax attention on the same q/k/v (jax.nn.dot_product_attention, cuDNN;
                `--impls` calls this row attn)
  peer          fla.ops.gsa.chunk_gsa (flash-linear-attention), when torch and fla import
  peer_jt       the same fla kernels launched from JAX (gsa_jax.ops.fla_triton, jax-triton; the
                `triton` extra): no torch tensors, the same timer as our rows, with fla's own
                autotune picks when the peer ran first in the process (else our defaults);
                not in the default --impls
Before timing, the Pallas outputs and gradients are compared with the float32 chunk form on the
same inputs (relative Frobenius error). Results go to experiments/results/bench_kernels_<tag>.json
and .md.

It also times one-step decoding (`gated_slot_attention_step` in a jitted scan) beside a scan that
only reads, decays and writes the state: the measurement behind using XLA's fused step for
generation instead of a decode kernel.

On a TPU the same command times the TPU kernels (impl="pallas" dispatches by backend) against
the chunk form at every shape, XLA's softmax attention in place of cuDNN's, and adds the
kernels' roofline estimate for the chip (pallas_kernels/tpu_plan.py).

Usage (GPU): python experiments/bench_kernels.py --tag h100 [--shapes main|all] [--no-peer]
Usage (TPU): python experiments/bench_kernels.py --tag v5e --shapes all
A sweep can be split over runs: `--only 0 1 2`, then `--only 3 --merge --no-check --no-decode`.
`--impls pallas chunk` times only those rows: the chunk form against the kernels (issue 15) is
`--shapes all --impls pallas chunk --no-peer --no-check --no-decode`.
The peer autotunes on its first call per (H, K, V, M), minutes each; shapes 0-2 share one tuning.
Memory: JAX numbers are XLA's compiled footprint of the jitted forward+backward (arguments +
outputs + temporaries); the peer's is torch.cuda.max_memory_allocated over one forward+backward
with its inputs already allocated. Both include the inputs and the gradients.

This file: the shapes, inputs, checks and JAX timings, and the command line; the peer's timing:
bench_kernels_peer.py; the page and the targets: bench_kernels_report.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from experiments import common, harness  # noqa: E402
from experiments.bench_kernels_peer import (bench_peer, cu_seqlens_of, peer_available,  # noqa: E402
                                            save_tune_cache, use_tune_cache)
from experiments.bench_kernels_report import markdown, target_lines  # noqa: E402,F401
from gsa_jax.ops import gated_slot_attention  # noqa: E402
from pallas_kernels import gla as pgla  # noqa: E402

TOKENS = 16384
MAIN = (8, 2048, 16, 128, 64)
# (B, T, H, K = V, M[, documents packed into each row through segment_ids])
ALL = [MAIN, (4, 4096, 16, 128, 64), (2, 8192, 16, 128, 64), (8, 2048, 4, 256, 64),
       (8, 2048, 16, 128, 32), (8, 2048, 16, 128, 128),
       (1, 16384, 16, 128, 64), (1, 32768, 16, 128, 64), (1, 65536, 16, 128, 64),
       (1, 16384, 16, 128, 64, 8)]
SHAPE_SETS = {"main": [0], "all": list(range(len(ALL))), "long": [6, 7, 8, 9]}
SHAPE_KEYS = ("B", "T", "H", "K", "M", "docs")


def shape_dict(shape) -> dict:
    return dict(zip(SHAPE_KEYS, shape))


def document_ids(shape, seed=5):
    """[B, T] int32 ids of `docs` documents of random lengths per row (None without docs)."""
    if len(shape) < 6:
        return None
    B, T, docs = shape[0], shape[1], shape[5]
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, T), size=(B, docs - 1), replace=False), axis=1)
    ids = np.zeros((B, T), np.int32)
    for b in range(B):
        for c in cuts[b]:
            ids[b, c:] += 1
    return jnp.asarray(ids)


def make_inputs(shape, dtype, seed=0, gate_scale=8.0):
    """Random GSA inputs like the layer makes them: swish features, g = logsigmoid(x)/8.

    A small gate_scale (0.05: g ≈ -14 per step on average) makes gates strong enough for the
    kernels' exact path."""
    B, T, H, K, M = shape[:5]
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.nn.swish(jax.random.normal(keys[0], (B, T, H, K)))
    k = jax.nn.swish(jax.random.normal(keys[1], (B, T, H, K)))
    v = jax.nn.silu(jax.random.normal(keys[2], (B, T, H, K)))
    g = jax.nn.log_sigmoid(jax.random.normal(keys[3], (B, T, H, M))) / gate_scale
    s = 1.0 - jnp.exp(g)
    return tuple(x.astype(dtype) for x in (q, k, v, s, g))


def gsa_fn(impl, segment_ids=None, **kw):
    def f(q, k, v, s, g):
        return gated_slot_attention(q, k, v, s, g, impl=impl, segment_ids=segment_ids, **kw)[0]
    return f


def loss_grad(f, cot):
    def loss(*args):
        return jnp.sum(f(*args).astype(jnp.float32) * cot)
    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))


def time_jax(fn, args, reps=20, rounds=7):
    """Median seconds per call of a jitted function; calls queue asynchronously per round."""
    out = fn(*args)
    jax.block_until_ready(out)
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / reps)
    return statistics.median(samples)


def compiled_bytes(fn, args):
    """XLA's footprint of the jitted `fn` at `args` (None where the backend reports none)."""
    try:
        return harness.compiled_bytes(fn.lower(*args).compile())
    except Exception:  # noqa: BLE001 - recorded as unknown, not fatal
        return None


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check(shape, dtype, gate_scale=8.0, impl="pallas"):
    """Relative error of the Pallas output and gradients (impl="peer_jt": the peer's kernels
    through gsa_jax.ops.fla_triton) against the f32 chunk form."""
    try:
        result = _check(shape, dtype, gate_scale, impl)
    except Exception as e:  # noqa: BLE001 - record and go on
        result = {"shape": list(shape), "dtype": str(jnp.dtype(dtype)),
                  "error": f"{type(e).__name__}: {str(e)[:300]}"}
    result["gates"] = "strong (exact path)" if gate_scale < 1 else "layer-like"
    result["impl"] = impl
    print("check", result, flush=True)
    return result


def _checked_fn(impl, seg):
    return gsa_fn("pallas", seg) if impl == "pallas" else peer_jt_fn(seg)


def peer_jt_fn(seg, configs=None):
    """The peer's kernels from JAX (gsa_jax.ops.fla_triton) on our inputs; packed documents
    (batch 1) go in as fla's cu_seqlens."""
    from gsa_jax.ops import fla_triton
    cu = None if seg is None else cu_seqlens_of(seg)

    def f(q, k, v, s, g):
        return fla_triton.chunk_gsa(q, k, v, s, g, launch="jax_triton", cu_seqlens=cu,
                                    configs=configs)
    return f


def _check(shape, dtype, gate_scale, impl="pallas"):
    args = make_inputs(shape, dtype, seed=1, gate_scale=gate_scale)
    cot = jax.random.normal(jax.random.PRNGKey(2), shape[:3] + (shape[3],), jnp.float32)
    ref_args = tuple(x.astype(jnp.float32) for x in args)
    seg = document_ids(shape)
    f = _checked_fn(impl, seg)
    out = {}
    o_p = jax.jit(f)(*args)
    o_r = jax.jit(gsa_fn("chunk", seg))(*ref_args)
    out["o"] = rel_err(o_p, o_r)
    g_p = jax.jit(loss_grad(f, cot))(*args)
    g_r = jax.jit(loss_grad(gsa_fn("chunk", seg), cot))(*ref_args)
    for name, a, b in zip("dq dk dv ds dg".split(), g_p, g_r):
        out[name] = rel_err(a, b)
    finite = all(bool(jnp.all(jnp.isfinite(x))) for x in (o_p, *g_p))
    return {"shape": list(shape), "dtype": str(jnp.dtype(dtype)), "rel_err": out,
            "finite": finite}


def copy_bandwidth():
    x = jnp.ones((4 if jax.default_backend() == "cpu" else 256, 1024, 1024), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    t = time_jax(f, (x,), reps=10, rounds=5)
    return 2 * x.nbytes / t


IMPLS = ("pallas", "pallas_recomp", "chunk", "attn", "peer")  # attn: softmax attention
EXTRA_IMPLS = ("peer_jt",)   # asked for by name only (--impls ... peer_jt)


def bench_shape(shape, dtype, bandwidth, with_chunk=True, tunings=None, impls=IMPLS,
                gate_scale=8.0, on_row=None):
    """Time one shape's JAX rows (the peer's: `peer_row`). tunings: {row name:
    `pallas_kernels.gla.Tuning` changes}, extra pallas rows each traced under its launch
    parameters (the defaults restored after). impls: the rows to time (of IMPLS; "attn" is
    softmax attention; "peer" is left to peer_row). gate_scale: make_inputs'. on_row: called
    with the shape's result so far after every timed row (a caller writes it: a call cut by
    its time limit mid-shape keeps the rows it timed)."""
    B, T, H, K, M = shape[:5]
    args = make_inputs(shape, dtype, gate_scale=gate_scale)
    seg = document_ids(shape)
    cot = jax.random.normal(jax.random.PRNGKey(3), (B, T, H, K), jnp.float32)
    rows = {}
    io_bytes = sum(x.nbytes for x in args) + args[0].nbytes  # read q,k,v,s,g; write o
    result = {"shape": shape_dict(shape), "results": rows,
              "memory_floor_fwd_ms": io_bytes / bandwidth * 1e3 if bandwidth else None}

    def timed(name):
        print(shape, name, rows[name], flush=True)
        if on_row is not None:
            on_row(result)
    variants = {
        "pallas": gsa_fn("pallas", seg),
        "pallas_recomp": gsa_fn("pallas", seg, recompute_states=True),
    }
    for name in tunings or {}:
        variants[name] = gsa_fn("pallas", seg)
    variants = {name: f for name, f in variants.items() if name.split()[0] in impls}
    if with_chunk and "chunk" in impls:
        variants["chunk"] = gsa_fn("chunk", seg)
    default_tuning = dataclasses.asdict(pgla.Tuning())
    # the first pallas row's output and gradients: every other pallas row is checked against them
    first_o = first_grads = None
    for name, f in variants.items():
        pgla.set_tuning(**{**default_tuning, **(tunings or {}).get(name, {})})
        try:
            fwd = jax.jit(f)
            fb = jax.jit(loss_grad(f, cot))
            rows[name] = {"fwd_ms": time_jax(fwd, args) * 1e3,
                          "fwd_bwd_ms": time_jax(fb, args) * 1e3,
                          "mem_bytes": compiled_bytes(fb, args)}
            if name.startswith("pallas"):   # a launch variant must not change the result
                o, grads = fwd(*args), fb(*args)
                if first_o is None:
                    first_o, first_grads = o, grads
                else:
                    rows[name]["rel_err_o_vs_pallas"] = rel_err(o, first_o)
                    rows[name]["rel_err_grads_vs_pallas"] = max(
                        rel_err(a, b) for a, b in zip(grads, first_grads))
        except Exception as e:  # noqa: BLE001 - record and go on (e.g. out of memory)
            rows[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        timed(name)
    pgla.set_tuning(**default_tuning)

    q, k, v = args[:3]
    # softmax attention on the same q/k/v: cuDNN's on a GPU, XLA's elsewhere (a TPU)
    attn_impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
    attn_row = f"{attn_impl}_attn"

    def attn(q, k, v):
        # packed rows: attention within each document, as GSA's state resets (cuDNN's own
        # packed layout is not used; a full causal pass is what a user without it runs)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=attn_impl)

    if "attn" in impls:
        try:
            fb = jax.jit(loss_grad(lambda q, k, v, s, g: attn(q, k, v), cot))
            rows[attn_row] = {"fwd_ms": time_jax(jax.jit(attn), (q, k, v)) * 1e3,
                              "fwd_bwd_ms": time_jax(fb, args) * 1e3,
                              "mem_bytes": compiled_bytes(fb, args)}
        except Exception as e:  # noqa: BLE001
            rows[attn_row] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        timed(attn_row)
    tpu_roofline(rows, shape, dtype)
    return result


def peer_row(shape, dtype, gate_scale=8.0):
    """The peer's row at one shape (its error where it fails), checked against our output;
    returns (row, the peer's output o or None)."""
    args, seg = make_inputs(shape, dtype, gate_scale=gate_scale), document_ids(shape)
    o_peer = None
    try:
        row, o_peer = bench_peer(make_inputs(shape, jnp.float32, gate_scale=gate_scale), seg,
                                 str(jnp.dtype(dtype)))
        # Same inputs, so the two implementations must agree to bf16 rounding.
        row["rel_err_o_vs_pallas"] = rel_err(jax.jit(gsa_fn("pallas", seg))(*args), o_peer)
    except Exception as e:  # noqa: BLE001
        row = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    print(shape, "peer", row, flush=True)
    return row, o_peer


def peer_jt_row(shape, dtype, gate_scale=8.0, after_peer=False, o_peer=None):
    """The peer's kernels launched from JAX (gsa_jax.ops.fla_triton), timed like our rows and
    checked against our output. after_peer: fla's own chunk_gsa already ran at this shape in
    this process, so its autotuners' picks are used (else fla_triton.DEFAULT_CONFIGS); o_peer:
    that run's output, which the same kernels on the same inputs must reproduce (compared as
    rel_err_o_vs_peer: ~0 with the peer's picks, bf16 rounding apart with other blocks)."""
    from gsa_jax.ops import fla_triton
    B, T, H, K, M = shape[:5]
    seg = document_ids(shape)
    args = make_inputs(shape, dtype, gate_scale=gate_scale)
    cot = jax.random.normal(jax.random.PRNGKey(3), (B, T, H, K), jnp.float32)
    try:
        configs = (fla_triton.tuned_configs(B, H, K, K, M, varlen=seg is not None)
                   if after_peer else {})
        f = peer_jt_fn(seg, configs)
        fwd, fb = jax.jit(f), jax.jit(loss_grad(f, cot))
        row = {"fwd_ms": time_jax(fwd, args) * 1e3, "fwd_bwd_ms": time_jax(fb, args) * 1e3,
               "mem_bytes": compiled_bytes(fb, args),
               "configs": ("fla's autotune picks (this process): " + json.dumps(configs)
                           if configs else "gsa_jax.ops.fla_triton.DEFAULT_CONFIGS")}
        o = fwd(*args)
        row["rel_err_o_vs_pallas"] = rel_err(o, jax.jit(gsa_fn("pallas", seg))(*args))
        if o_peer is not None:
            row["rel_err_o_vs_peer"] = rel_err(o, o_peer)
    except Exception as e:  # noqa: BLE001 - record and go on
        row = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    print(shape, "peer_jt", row, flush=True)
    return row


def tpu_roofline(rows, shape, dtype):
    """On a TPU, a 'roofline' row: the TPU kernels' estimated floor on this chip
    (pallas_kernels/tpu_plan.py: FLOPs and HBM bytes per token at the published peaks)."""
    from pallas_kernels import tpu_plan

    chip = tpu_plan.chip_of(jax.devices()[0].device_kind)
    if jax.default_backend() != "tpu" or chip is None:
        return
    B, T, H, K, M = shape[:5]
    kw = dict(B=B, T=T, H=H, K=K, V=K, M=M, itemsize=jnp.dtype(dtype).itemsize)
    rows[f"roofline {chip}"] = {"fwd_ms": tpu_plan.gsa_roofline_ms(chip, backward=False, **kw),
                                "fwd_bwd_ms": tpu_plan.gsa_roofline_ms(chip, **kw),
                                "mem_bytes": None}


def bench_decode(B, dtype, bandwidth, smoke=False, steps=256):
    """Per-token latency of one-step GSA decoding (`gated_slot_attention_step`, XLA-fused) in a
    jitted scan over `steps` tokens, beside a scan doing the least any decode kernel must do:
    read the state, decay it with the step's gate, write it back, emit one row. If the two are
    close, a hand-written decode kernel has nothing to win."""
    from jax import lax

    from gsa_jax.ops import gated_slot_attention_step

    H, K, M = (2, 16, 16) if smoke else (16, 128, 64)
    keys = jax.random.split(jax.random.PRNGKey(4), 5)
    q, k, v = (jax.nn.swish(jax.random.normal(kk, (steps, B, H, K))).astype(dtype)
               for kk in keys[:3])
    g = (jax.nn.log_sigmoid(jax.random.normal(keys[3], (steps, B, H, M))) / 8).astype(dtype)
    s = 1 - jnp.exp(g)
    hk = jax.random.normal(keys[4], (B, H, K, M), jnp.float32)
    hv = jax.random.normal(keys[4], (B, H, M, K), jnp.float32)

    def decoder(impl):
        @jax.jit
        def decode(hk, hv, q, k, v, s, g):
            def body(state, x):
                o, state = gated_slot_attention_step(*x, state, impl=impl)
                return state, o
            return lax.scan(body, (hk, hv), (q, k, v, s, g))
        return decode

    @jax.jit
    def floor(hk, hv, q, k, v, s, g):
        def body(state, x):
            hk, hv = state
            decay = jnp.exp(x[4].astype(jnp.float32))
            hk, hv = hk * decay[:, :, None, :], hv * decay[..., None]
            return (hk, hv), hv[:, :, 0, :].astype(dtype)
        return lax.scan(body, (hk, hv), (q, k, v, s, g))

    args = (hk, hv, q, k, v, s, g)
    xla_decode, kernel_decode = decoder("xla"), decoder("pallas")
    t_step = time_jax(xla_decode, args, reps=5, rounds=5) / steps
    # The fused decode kernel (interpreted off a GPU: timed there only as a smoke check).
    kernel_err = rel_err(kernel_decode(*args)[1], xla_decode(*args)[1])
    t_kernel = time_jax(kernel_decode, args, reps=5, rounds=5) / steps
    t_floor = time_jax(floor, args, reps=5, rounds=5) / steps
    state_bytes = hk.nbytes + hv.nbytes
    out = {"B": B, "H": H, "K": K, "V": K, "M": M, "steps": steps,
           "step_us": t_step * 1e6, "pallas_step_us": t_kernel * 1e6,
           "pallas_vs_xla_rel_err": kernel_err, "state_touch_us": t_floor * 1e6,
           "state_rw_floor_us": 2 * state_bytes / bandwidth * 1e6 if bandwidth else None}
    print("decode", out, flush=True)
    return out



def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="main", choices=sorted(SHAPE_SETS),
                    help="main: shape 0; long: 6-9 (batch 1, T = 16K..64K, and a packed row); "
                         "all: every shape. By index: " + ", ".join(
                             f"{i}={s}" for i, s in enumerate(ALL)) + " (B,T,H,K=V,M[,docs])")
    ap.add_argument("--only", type=int, nargs="+", default=None,
                    help="indices into the full shape list (split a sweep over runs)")
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS + EXTRA_IMPLS,
                    help="the rows to time (default: all but peer_jt; the peer only where it "
                         "imports)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script (CPU)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows and checks of an existing results file of the same tag "
                         "(a re-measured shape's impls are replaced, its other impls kept)")
    ap.add_argument("--dtype", default="bfloat16", help="input dtype (default bfloat16)")
    ap.add_argument("--no-peer", action="store_true", help="skip the peer (same as leaving "
                    "'peer' out of --impls)")
    ap.add_argument("--chunk-shapes", type=int, default=None,
                    help="time the pure-JAX chunk form on the first N shapes of the list only "
                         "(default: every shape timed)")
    ap.add_argument("--no-check", action="store_true",
                    help="skip the correctness checks of the kernels against the chunk form")
    ap.add_argument("--no-decode", action="store_true", help="skip the one-step decode timing")
    ap.add_argument("--tag", default=jax.default_backend(),
                    help="results file suffix: bench_kernels_<tag>.json/.md")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                    help='an extra pallas row under other launch parameters, e.g. '
                         '\'bv64={"block_v": 64}\' (pallas_kernels.gla.Tuning fields); repeatable')
    ap.add_argument("--gate-scale", type=float, default=8.0,
                    help="timed inputs' gates g = logsigmoid(x) / S (8: layer-like, no kernel "
                         "tile past the chunk bound; 0.5: ~81%% of tiles past it, like trained "
                         "MQAR gates: bench_gate_strength.py)")
    ap.add_argument("--peer-tune-cache", default=None, metavar="DIR",
                    help="keep the peer's Triton autotuning results on disk, seeded from DIR "
                         "(<hash>/<kernel>.autotune.json, e.g. experiments/peer_tune_cache/h200); "
                         "the results of this run go to <out>/peer_tune_cache_<tag>.tgz")
    ap.add_argument("--note", action="append", default=[],
                    help="a line for the report (how the run was made); repeatable")
    ap.add_argument("--out", default=str(common.RESULTS_DIR), help="results folder")
    args = ap.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    wants_peer = not args.no_peer and "peer" in args.impls
    tune_cache = None   # before anything imports fla (the peer_jt checks do)
    if args.peer_tune_cache is not None and wants_peer:
        tune_cache = use_tune_cache(args.peer_tune_cache)
    tunings = {}
    for item in args.variant:
        name, _, spec = item.partition("=")
        try:
            tunings["pallas " + name] = changes = json.loads(spec)
            pgla.Tuning(**changes)
        except (json.JSONDecodeError, TypeError) as e:
            ap.error(f"--variant {item!r}: want NAME=JSON of Tuning fields ({e})")
    indices = args.only if args.only is not None else SHAPE_SETS[args.shapes]
    shapes = [ALL[i] for i in indices]
    # the third and fourth take the two-level state passes (few programs, many chunks), one
    # packed; the last a large state (M = 128: the second pass's key blocks in a loop)
    check_shapes = [(2, 512, 4, 128, 64), (2, 300, 4, 64, 32), (1, 4096, 4, 128, 64),
                    (1, 3000, 2, 64, 32, 5), (2, 512, 4, 128, 128)]
    decode_batches = (1, 8, 64)
    if args.smoke:
        indices, shapes, check_shapes = [0], [(1, 64, 2, 16, 16)], [(1, 40, 2, 16, 16)]
        decode_batches = (1,)
    dev = jax.devices()[0]
    report = {"tag": args.tag, "device": f"{dev.platform} {dev.device_kind}",
              "jax": jax.__version__, "python": platform.python_version(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": common.command_line(argv, __file__), "dtype": str(dtype),
              "notes": list(args.note), "gate_scale": args.gate_scale}
    report["checks"] = [] if args.no_check else (
        [check(s, dtype) for s in check_shapes] + [check(check_shapes[0], jnp.float32),
                                                   check(check_shapes[0], dtype, 0.05)]
        + ([check(s, dtype, impl="peer_jt") for s in check_shapes]
           if "peer_jt" in args.impls else []))
    bw = copy_bandwidth()
    report["copy_bandwidth_GBps"] = bw / 1e9
    report["decode"] = [] if args.no_decode else [
        bench_decode(B, dtype, bw, smoke=args.smoke) for B in decode_batches]
    use_peer = wants_peer and peer_available()
    report["rows"] = []
    previous = harness.read_report(args.tag, "bench_kernels", args.out) if args.merge else None
    if previous is not None:
        report["rows"] = previous["rows"]
        report["checks"] = previous["checks"] + report["checks"]
        report["decode"] = report["decode"] or previous.get("decode", [])
        report["command"] = previous["command"] + " ; then " + report["command"]
        report["notes"] = previous.get("notes", []) + report["notes"]
    on_tpu = jax.default_backend() == "tpu"  # TPU rows: the TPU kernels and the chunk form
    def write():
        report["rows"].sort(key=lambda r: ALL.index(tuple(r["shape"].values()))
                            if tuple(r["shape"].values()) in ALL else -1)
        common.write_results(args.tag, "bench_kernels", report, markdown(report),
                             out_dir=args.out, footer=False)  # the page names its machine

    # The JAX rows of every shape first, then the peer's: its autotuning restarts in every
    # process (5+ minutes on an H200), and a run cut short must not lose the rows before it.
    # Results are rewritten after every timed row.
    new_rows = []
    for i, s in zip(indices, shapes):
        with_chunk = args.chunk_shapes is None or i < args.chunk_shapes or on_tpu
        # --merge: a re-measured shape keeps the rows of impls this run did not time
        # (e.g. a call that adds the peer to shapes whose JAX rows an earlier call wrote)
        old = [r for r in report["rows"] if r["shape"] == shape_dict(s)]
        old_results = old[0]["results"] if old else {}

        def keep(row, old_results=old_results):
            entry = {**row, "results": {**old_results, **row["results"]}}
            report["rows"] = [r for r in report["rows"] if r["shape"] != row["shape"]]
            report["rows"].append(entry)
            write()
            return entry

        row = bench_shape(s, dtype, bw, with_chunk=with_chunk, tunings=tunings,
                          impls=args.impls, gate_scale=args.gate_scale, on_row=keep)
        new_rows.append(keep(row))
    for s, row in zip(shapes, new_rows) if use_peer or "peer_jt" in args.impls else ():
        o_peer = None
        if use_peer:
            row["results"]["peer"], o_peer = peer_row(s, dtype, args.gate_scale)
        if "peer_jt" in args.impls:   # after the peer: its autotune picks are then known
            row["results"]["peer_jt"] = peer_jt_row(s, dtype, args.gate_scale,
                                                    after_peer=use_peer, o_peer=o_peer)
        write()
        if tune_cache is not None:   # after every shape, like the rows: a cut call keeps them
            n = save_tune_cache(tune_cache, os.path.join(
                args.out, f"peer_tune_cache_{args.tag}.tgz"))
            print(f"peer autotune results saved: {n}")
    md = markdown(report)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Launch-parameter sweep of the GSA Pallas kernels at one shape (GPU).

Times (1) each kernel on its own for both GSA passes and (2) the whole GSA forward and
forward+backward under several `pallas_kernels.gla.Tuning`s, and writes
experiments/results/tune_kernels_<tag>.json. Usage: python experiments/tune_kernels.py --tag h100
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from experiments.bench_kernels import ALL, MAIN, check, gsa_fn, loss_grad, make_inputs, time_jax  # noqa: E402
from pallas_kernels import gla as pgla  # noqa: E402
from pallas_kernels.gla_bwd import dstates_bwd, grads_bwd  # noqa: E402
from pallas_kernels.gla_fwd import fused_fwd, output_fwd, states_fwd  # noqa: E402

TUNINGS = {
    "default": dict(),
    "stages 3": dict(stages=3),
    "par warps 4": dict(warps_par=4),
    "fused warps 4": dict(warps_fused=4),
    "split forward": dict(fused_forward=False),
    "recompute": dict(recompute=True),
    "strong gates (exact path)": dict(strong=True),
}


DEFAULT_TUNING = dataclasses.asdict(pgla.Tuning())


def kernel_times(shape, dtype):
    """Each kernel alone, for the two passes of GSA at `shape`, default tuning."""
    q, k, v, s, g = make_inputs(shape, dtype)
    B, T, H, K, M = shape
    out = {}
    passes = {"pass1(value gate)": (q, k, s, g, False), "pass2(key gate)": (s, s, v, g, True)}
    for name, (a, b, c, d, key_gated) in passes.items():
        V = c.shape[-1]
        s0 = jnp.zeros((B, H, a.shape[-1], V), jnp.float32)
        kw = dict(key_gated=key_gated, chunk_size=64, block_v=128, num_stages=2)
        st, _ = states_fwd(a, b, c, d, s0, None, num_warps=4, **kw)
        do = jnp.ones((B, T, H, V), dtype)
        fns = {
            "states_fwd": (lambda a, b, c, d: states_fwd(a, b, c, d, s0, None, num_warps=4,
                                                         **kw), (a, b, c, d)),
            "output_fwd": (lambda a, b, c, d, st: output_fwd(
                a, b, c, d, st, None, scale=1.0, out_dtype=dtype, num_warps=8, **kw),
                (a, b, c, d, st)),
            "fused_fwd": (lambda a, b, c, d: fused_fwd(a, b, c, d, s0, None, scale=1.0,
                                                       out_dtype=dtype, num_warps=8, **kw),
                          (a, b, c, d)),
            "dstates_bwd": (lambda a, c, d, do: dstates_bwd(a, c, d, None, do, s0, scale=1.0,
                                                            num_warps=4, **kw), (a, c, d, do)),
            "grads_bwd": (lambda a, b, c, d, st, do: grads_bwd(
                a, b, c, d, None, st, st, do, scale=1.0, num_warps=8, **kw),
                (a, b, c, d, st, do)),
        }
        for kname, (f, args) in fns.items():
            try:
                out[f"{name} {kname}"] = time_jax(jax.jit(f), args) * 1e3
            except Exception as e:  # noqa: BLE001
                out[f"{name} {kname}"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(name, kname, out[f"{name} {kname}"], flush=True)
    return out


def forward_sweep(shape_indices, dtype):
    """Forward (and forward+backward) time over forward path x chunk size x value block, at
    several sequence lengths: the data behind the forward path chosen per shape."""
    rows = []
    for i in shape_indices:
        shape = ALL[i]
        x = make_inputs(shape, dtype)
        cot = jax.random.normal(jax.random.PRNGKey(3), shape[:4], jnp.float32)
        for fused in (True, False):
            for C in (64, 128):
                for bv in (32, 64, 128):
                    pgla.set_tuning(**{**DEFAULT_TUNING, "fused_forward": fused, "block_v": bv})
                    f = gsa_fn("pallas", chunk_size=C)
                    r = {"shape": shape, "fused": fused, "chunk": C, "block_v": bv}
                    try:
                        r["fwd_ms"] = time_jax(jax.jit(f), x) * 1e3
                        if not fused and bv == 128:  # the backward does not depend on fused
                            r["fwd_bwd_ms"] = time_jax(jax.jit(loss_grad(f, cot)), x) * 1e3
                    except Exception as e:  # noqa: BLE001
                        r["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    print("sweep", r, flush=True)
                    rows.append(r)
    pgla.set_tuning(**DEFAULT_TUNING)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", default=jax.default_backend())
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--forward-sweep", type=int, nargs="+", default=None, metavar="SHAPE",
                    help="only sweep the forward path over these indices of the shape list")
    args = ap.parse_args()
    if args.forward_sweep is not None:
        report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec="seconds"),
                  "command": "python " + " ".join(sys.argv),
                  "forward_sweep": forward_sweep(args.forward_sweep, jnp.bfloat16)}
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"tune_forward_{args.tag}.json"), "w") as fh:
            json.dump(report, fh, indent=1)
        return
    dtype = jnp.bfloat16
    shape = MAIN
    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + " ".join(sys.argv), "shape": shape,
              "checks": [check((2, 512, 4, 128, 64), dtype),
                         check((2, 512, 4, 128, 64), dtype, gate_scale=0.05)],
              "kernels_ms": kernel_times(shape, dtype), "tunings": {}}
    cot = jax.random.normal(jax.random.PRNGKey(3), shape[:4], jnp.float32)
    for name, t in TUNINGS.items():
        t = dict(t)
        recompute, strong = t.pop("recompute", False), t.pop("strong", False)
        pgla.set_tuning(**{**DEFAULT_TUNING, **t})
        f = gsa_fn("pallas", recompute_states=recompute)
        x = make_inputs(shape, dtype, gate_scale=0.05 if strong else 8.0)
        try:
            r = {"fwd_ms": time_jax(jax.jit(f), x) * 1e3,
                 "fwd_bwd_ms": time_jax(jax.jit(loss_grad(f, cot)), x) * 1e3}
        except Exception as e:  # noqa: BLE001
            r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        report["tunings"][name] = r
        print(name, r, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"tune_kernels_{args.tag}.json"), "w") as fh:
        json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()

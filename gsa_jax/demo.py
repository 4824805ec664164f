"""Demo: the three forms of gated slot attention agree, and how long each takes here.

    python -m gsa_jax.demo [--batch 2 --seq-len 256 --heads 4 --head-dim 32 --slots 16]

Draws layer-like random inputs (q, k = swish(·), v = silu(·), g = log σ(·)/8, s = 1 − exp g),
runs the recurrent, parallel and chunk forms of `gated_slot_attention` jitted on the default
backend, and prints one row per form: median forward and forward+backward time, and the largest
difference of the output and of the gradients (w.r.t. q, k, v, s, g) from the recurrent form,
relative to the largest magnitude. Exits 1 if a form disagrees beyond the dtype's tolerance.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from gsa_jax.ops import gated_slot_attention

FORMS = ("recurrent", "parallel", "chunk")
TOLERANCE = {"float64": 1e-10, "float32": 1e-4}  # relative to the largest magnitude


def make_inputs(seed: int, B: int, T: int, H: int, D: int, M: int, dtype) -> tuple:
    """(q, k, v [B, T, H, D], s, g [B, T, H, M]) as the GSA layer would produce them."""
    keys = jax.random.split(jax.random.key(seed), 5)
    normal = lambda key, d: jax.random.normal(key, (B, T, H, d), jnp.float32)
    q, k, v = (jax.nn.swish(normal(key, D)) for key in keys[:3])
    g = jax.nn.log_sigmoid(normal(keys[3], M)) / 8.0  # gate_logit_normalizer τ = 8
    s = 1.0 - jnp.exp(g)
    return tuple(x.astype(dtype) for x in (q, k, v, s, g))


def median_ms(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def max_rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32, help="K = V")
    parser.add_argument("--slots", type=int, default=16, help="M")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(TOLERANCE), default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.dtype(args.dtype)
    inputs = make_inputs(0, args.batch, args.seq_len, args.heads, args.head_dim, args.slots,
                         dtype)
    cotangent = jax.random.normal(jax.random.key(1), inputs[2].shape, dtype)

    rows, reference = [], None
    for impl in FORMS:
        def forward(*x, impl=impl):
            return gated_slot_attention(*x, impl=impl, chunk_size=args.chunk_size)[0]

        def loss(*x, forward=forward):
            return jnp.sum(forward(*x) * cotangent)

        fwd = jax.jit(forward)
        fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
        o, grads = fwd(*inputs), fwd_bwd(*inputs)
        if reference is None:
            reference = (o, grads)
        o_diff = max_rel_diff(o, reference[0])
        grad_diff = max(max_rel_diff(a, b) for a, b in zip(grads, reference[1]))
        rows.append((impl, median_ms(fwd, inputs, args.repeats),
                     median_ms(fwd_bwd, inputs, args.repeats), o_diff, grad_diff))

    device = jax.devices()[0]
    print(f"gsa-jax demo: gated_slot_attention, B={args.batch} T={args.seq_len} "
          f"H={args.heads} K=V={args.head_dim} M={args.slots} chunk={args.chunk_size} "
          f"{args.dtype}, {device.platform} ({device.device_kind}), jax {jax.__version__}, "
          f"median of {args.repeats}")
    header = ("form", "forward ms", "fwd+bwd ms", "o vs recurrent", "grads vs recurrent")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for impl, t_fwd, t_bwd, o_diff, grad_diff in rows:
        print(f"| {impl} | {t_fwd:.2f} | {t_bwd:.2f} | {o_diff:.1e} | {grad_diff:.1e} |")
    worst = max(max(r[3], r[4]) for r in rows)
    agree = worst <= TOLERANCE[args.dtype]
    print(f"forms agree: {'yes' if agree else 'NO'} (largest relative difference {worst:.1e}, "
          f"tolerance {TOLERANCE[args.dtype]:.0e})")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())

"""Where the pure-JAX chunk form's time goes: each part of `gsa_jax.ops.chunk`, forward and
vjp, timed alone at GSA's two pass shapes (issue 15's profile of the XLA chunk form).

    PYTHONPATH=. python experiments/chunk_parts.py --tag h200               # B=8 T=2048
    PYTHONPATH=. python experiments/chunk_parts.py --tag h200 --shape 1 16384
    PYTHONPATH=. python experiments/chunk_parts.py --tag cpu --shape 1 128 --repeats 3   # smoke

GSA runs GLA twice (gsa_jax/ops/gsa.py): pass 1 gated on the value axis (q, k: K = 128 per
head, v = the slot scores s: M = 64), pass 2 gated on the key axis (q = softmax scores: M = 64,
k = s, v: V = 128). Each part is jitted on its own with the inputs it gets inside the form
(chunked, float32, the module docstring of gsa_jax/ops/chunk.py names them):

    prepare    chunking, padding, cast to float32, b = cumsum(g) within each chunk
    delta      what each chunk adds to the state (one matmul per chunk)
    scan       the states entering each chunk (blocks of 8 chunks, recursive)
    inter      the chunk-entering state's share of the output
    diag       pairs inside diagonal blocks of 8 steps (exp(b_t − b_i) taken directly)
    levelH     pairs across the halves of blocks of 2H steps (two small batched matmuls)
    intra      diag + all levels, as the form runs them
    full       the whole pass, forward and forward+backward (what the benchmark times)

Parts timed alone overlap less than inside one jit, so their sum exceeds `full`; their ratios
say where to look. Results: experiments/results/chunk_parts_<tag>.{json,md}. Median ms.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402

PASSES = (("pass1 (value gate)", 128, 64, False), ("pass2 (key gate)", 64, 128, True))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tag", required=True)
    p.add_argument("--shape", type=int, nargs=2, default=[8, 2048], metavar=("B", "T"))
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out-dir", default=None)
    return p.parse_args(argv)


def timer(repeats: int):
    import jax
    import numpy as np

    def bench(f, *args) -> float:
        f = jax.jit(f)
        jax.block_until_ready(f(*args))  # compile
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(f(*args))
            times.append(time.perf_counter() - start)
        return float(np.median(times)) * 1e3
    return bench


def time_pass(B, T, H, C, K, V, key_gated, bench, seed) -> dict[str, float]:
    import jax
    import jax.numpy as jnp

    from gsa_jax.ops import chunk as ch
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    q, k = (jax.random.normal(kk, (B, T, H, K), jnp.bfloat16) for kk in keys[:2])
    v = jax.random.normal(keys[2], (B, T, H, V), jnp.bfloat16)
    # Layer-like gates: log σ(x + 3) / 8, as bench_kernels draws them.
    g = jax.nn.log_sigmoid(jax.random.normal(keys[3], (B, T, H, V if not key_gated else K))
                           + 3.0) / 8
    s0 = 0.1 * jax.random.normal(keys[4], (B, H, K, V), jnp.float32)
    gate_axis = "key" if key_gated else "value"

    def prepare(q, k, v, g):
        return ch._prepare(q, k, v, g, jnp.float32, K ** -0.5, C)

    qc, kc, vc, b = jax.jit(prepare)(q, k, v, g)
    do = jax.random.normal(keys[0], vc.shape, jnp.float32)
    delta_fn = jax.jit(lambda k, v, b: ch._chunk_delta(k, v, b, None, key_gated))
    delta, a = delta_fn(kc, vc, b)
    scan_fn = jax.jit(lambda d, a, s0: ch._scan(d, a, s0, key_gated))
    s_in, _ = scan_fn(delta, a, s0)

    def vjp_of(fn):
        return lambda *xs: jax.vjp(fn, *xs[:-1])[1](xs[-1])

    diag = lambda q, k, v, b: ch._diagonal_blocks(q, k, v, b, None, key_gated)  # noqa: E731
    r = {"prepare": bench(prepare, q, k, v, g),
         "delta": bench(delta_fn, kc, vc, b),
         "scan": bench(scan_fn, delta, a, s0),
         "inter": bench(lambda q, b, s: ch._inter(q, b, s, None, key_gated), qc, b, s_in),
         "diag": bench(diag, qc, kc, vc, b)}
    for h in ch._level_sizes(C):
        level = lambda q, k, v, b, h=h: ch._cross_level(q, k, v, b, None, h, key_gated)  # noqa
        r[f"level{h}"] = bench(level, qc, kc, vc, b)
        r[f"level{h}_vjp"] = bench(vjp_of(level), qc, kc, vc, b, do)
    r["intra"] = bench(lambda q, k, v, b: ch._intra(q, k, v, b, None, key_gated),
                       qc, kc, vc, b)
    r["diag_vjp"] = bench(vjp_of(diag), qc, kc, vc, b, do)
    r["intra_vjp"] = bench(
        lambda q, k, v, b, do: ch._intra_vjp(q, k, v, b, None, key_gated, do,
                                             tuple(jnp.zeros_like(x) for x in (q, k, v, b))),
        qc, kc, vc, b, do)
    r["scan_vjp"] = bench(
        lambda d, a, s0, ds: jax.vjp(lambda d, a, s0: ch._scan(d, a, s0, key_gated),
                                     d, a, s0)[1]((ds, jnp.zeros_like(s0))), delta, a, s0, s_in)

    def full(q, k, v, g, s0):
        return ch.gla_chunk(q, k, v, g, gate_axis=gate_axis, scale=K ** -0.5,
                            initial_state=s0, runs=None, chunk_size=C)

    def loss(q, k, v, g, s0):
        o, s = full(q, k, v, g, s0)
        return jnp.sum(o.astype(jnp.float32) * do[..., :1].mean()) + jnp.sum(s)

    r["full_fwd"] = bench(full, q, k, v, g, s0)
    r["full_fwd_bwd"] = bench(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), q, k, v, g, s0)
    return r


def markdown(record) -> str:
    rows = record["passes"]
    names = list(next(iter(rows.values())))
    cfg = record["config"]
    table = common.markdown_table(["part"] + list(rows),
                                  [[n] + [f"{rows[p][n]:.3f}" for p in rows] for n in names])
    return "\n".join([f"# The XLA chunk form's parts (B={cfg['B']}, T={cfg['T']}, H={cfg['H']}, "
                      f"C={cfg['C']}; bf16 inputs, float32 compute)", "",
                      "Median ms of each part jitted alone (see experiments/chunk_parts.py).",
                      "", table])


def main(argv=None) -> int:
    args = parse_args(argv)
    common.ensure_importable()
    bench = timer(args.repeats)
    (B, T), H, C = args.shape, args.heads, args.chunk_size
    passes = {}
    for i, (name, K, V, key_gated) in enumerate(PASSES):
        passes[name] = time_pass(B, T, H, C, K, V, key_gated, bench, seed=i)
        print(name, {k: round(v, 3) for k, v in passes[name].items()}, flush=True)
    record = {"config": {"B": B, "T": T, "H": H, "C": C, "repeats": args.repeats},
              "passes": passes}
    common.write_and_print(args.tag, "chunk_parts", record, markdown(record),
                           out_dir=args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

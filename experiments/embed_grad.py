"""Token embedding forward+backward: flax's nn.Embed (table cast to the compute dtype, so the
gradient's scatter-add runs in it) against gsa_jax.layers.Embed (rows gathered from the float32
table, scatter-add in float32), on ids where one token repeats (MQAR's filler token) and on
uniform ids.

    python experiments/embed_grad.py --tag h200            # ~1 min on an H200
    python experiments/embed_grad.py --tag cpu --smoke

Per case: median ms of jit(value_and_grad) of sum(embed(ids) * w) over the table, and the
gradient's relative error (max over rows of |g - g64| / max|g64|) against a float64 sum.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common, harness  # noqa: E402

NAME = "embed_grad"


def ids_for(kind: str, rows: int, length: int, vocab: int, seed: int = 0):
    """int32 [rows, length]: 'uniform' ids, or 'repeated': 60% of positions token 0 (MQAR's
    filler share at T = 512, 64 pairs), the rest uniform."""
    import numpy as np
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(rows, length), dtype=np.int32)
    if kind == "repeated":
        ids[rng.random((rows, length)) < 0.6] = 0
    return ids


def run_case(module: str, kind: str, rows: int, length: int, vocab: int, width: int,
             repeats: int) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gsa_jax.layers import Embed

    cls = {"flax nn.Embed": nn.Embed, "gsa_jax Embed": Embed}[module]
    embed = cls(vocab, width, dtype=jnp.bfloat16)
    ids = jnp.asarray(ids_for(kind, rows, length, vocab))
    params = embed.init(jax.random.key(0), ids[:1, :1])["params"]
    w = jax.random.normal(jax.random.key(1), (rows, length, width), jnp.float32)

    def loss(p):
        return jnp.sum(embed.apply({"params": p}, ids).astype(jnp.float32) * w)

    step = jax.jit(jax.value_and_grad(loss))
    run = lambda: jax.block_until_ready(step(params))
    median, _ = harness.time_calls(run, repeats, warmup=1)
    grad = np.asarray(step(params)[1]["embedding"], np.float64)
    # Reference: the same bfloat16-rounded cotangents summed in float64.
    w_bf = np.asarray(w.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    ref = np.zeros((vocab, width))
    np.add.at(ref, np.asarray(ids).reshape(-1), w_bf.reshape(-1, width))
    err = float(np.max(np.abs(grad - ref)) / np.max(np.abs(ref)))
    return {"module": module, "ids": kind, "rows": rows, "length": length, "vocab": vocab,
            "width": width, "ms": round(median * 1e3, 3), "rel_err": err}


def report(tag: str, rows: int, length: int, vocab: int, cases: list[dict]) -> str:
    table = common.markdown_table(
        ["ids", "D", "module", "fwd+bwd ms", "grad rel. error vs float64"],
        [(c["ids"], c["width"], c["module"], common.fmt(c["ms"], 3), f"{c['rel_err']:.1e}")
         for c in cases], "llrrr")
    return (f"# Embedding forward+backward, bfloat16 compute ({tag})\n\n"
            f"ids [{rows}, {length}] over V = {vocab}; 'repeated': 60% of positions one token. "
            "flax's nn.Embed casts the table to bfloat16 and its gradient scatter-adds in "
            "bfloat16; gsa_jax's Embed gathers from the float32 table (scatter-add in float32). "
            "Error: max |grad - float64 sum| / max |float64 sum| of the same bfloat16 "
            "cotangents.\n\n" + table + "\n")


def main(argv=None) -> int:
    p = common.argument_parser(__doc__)
    p.add_argument("--smoke", action="store_true", help="small sizes (CPU)")
    p.add_argument("--widths", type=int, nargs="+", default=[64],
                   help="embedding widths D (each adds four cases)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    import jax
    tag = args.tag or jax.default_backend()
    # Batch x length of the MQAR authors' cell (12 runs x 128 rows x 512), V = 8192.
    rows, length, vocab = (16, 64, 512) if args.smoke else (1536, 512, 8192)
    widths = [16] if args.smoke else args.widths
    cases = []
    for width in widths:
        for kind in ("repeated", "uniform"):
            for module in ("flax nn.Embed", "gsa_jax Embed"):
                cases.append(run_case(module, kind, rows, length, vocab, width, args.repeats))
                print(cases[-1], flush=True)
                # Written after every case: nn.Embed's slow case can cut a timed call short.
                common.write_results(tag, NAME, {"tag": tag, "cases": cases},
                                     report(tag, rows, length, vocab, cases),
                                     out_dir=args.out_dir)
    print(report(tag, rows, length, vocab, cases), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

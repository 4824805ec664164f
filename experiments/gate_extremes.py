"""How often a model's gates send a kernel chunk off the fast intra-chunk path.

The GPU/TPU kernels (pallas_kernels/chunk_math.py) factor the intra-chunk decay e^{b_t − b_i}
through the chunk's midpoint, which is safe only while every gated channel of a tile decays by
at most MAX_CHUNK_DECAY (|Σ_chunk g| ≤ 120, natural log) over the chunk; a tile with a stronger
gate takes the sub-chunk tier (matmuls per 16-step sub-chunk, the default since 2026-12-04) if
no 16-step sub-chunk passes the bound (the C = 16 column counts those), else an in-kernel loop
over the C source positions (before the tier, every such tile looped). This script loads a
trained MQAR cell (mqar_authors.py's --state-dir files), runs its held-out rows, and counts,
per layer and run, the fraction of (row, head, chunk) tiles whose gate passes that bound, next
to the same count at the cell's initialisation:

    extreme(row, head, chunk) = max_k ( −Σ_{t ∈ chunk} g[row, t, head, k] ) > MAX_CHUNK_DECAY

(k over the gated channels of the head: GLA's key channels, GSA's slots; the GPU kernels tile
the whole gated axis of a head at the MQAR widths). It explains the MQAR cells' speed drift:
GLA and GSA slowed as their gates learned to forget sharply; RetNet (fixed decays, never past
the bound) did not.

    python experiments/gate_extremes.py --state tcache/mqstate/gla_D64 --model gla --tag \
        h200e64_gla64 --widths 64 --lr 2e-3 5e-3 --seeds 2 --dtype bfloat16 --max-epochs 64

(the options after --tag are the cell's own mqar_authors.py options)

Gates are computed in float32 from the bfloat16 model as trained (the --dtype of the run).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402

GATE_MODULES = {"gla": ("gk_up", 16.0), "gsa": ("f_proj", 16.0)}   # (gate logits, normaliser)


def parse_args(argv=None):
    """(this script's options, the cell's mqar_authors.py arguments): every option not listed
    here is the trained cell's own (--widths D --lr ... --seeds N --dtype ...), passed on to
    mqar_authors.parse_args so that the model and the state's identity are the cell's."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--state", required=True, help="a cell's state prefix (DIR/<model>_D<width>)")
    p.add_argument("--model", required=True, choices=sorted(GATE_MODULES))
    p.add_argument("--rows", type=int, default=256, help="held-out rows run")
    p.add_argument("--chunk", type=int, nargs="+", default=[64, 32, 16],
                   help="chunk sizes C counted (the kernels' default: 64)")
    p.add_argument("--tag", required=True)
    p.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    args, cell_argv = p.parse_known_args(argv)
    from experiments import mqar_authors as ma
    margs = ma.parse_args(cell_argv + ["--models", args.model, "--tag", "gate_extremes"])
    if len(margs.widths) != 1:
        p.error("give the cell's one width (--widths D)")
    return args, margs


def chunk_decays(g_BTHK, chunk: int):
    """[B, T/C, H] max over the gated channels of −Σ_chunk g (the tile's strongest decay)."""
    import jax.numpy as jnp
    B, T, H, K = g_BTHK.shape
    sums = -g_BTHK[:, :T - T % chunk].reshape(B, T // chunk, chunk, H, K).sum(axis=2)
    return jnp.max(sums, axis=-1)


def layer_gates(model, params, x_BT, name: str, heads: int):
    """[layers] gate log-decays g [B, T, H, K] of every mixer (float32), from the captured
    gate-logit projections (K: GLA's key channels or GSA's slots per head)."""
    import jax
    import jax.numpy as jnp
    module, tau = GATE_MODULES[name]
    _, state = model.apply({"params": params}, x_BT, capture_intermediates=True,
                           mutable=["intermediates"])
    inter = state["intermediates"]
    out = []
    for layer in sorted((k for k in inter if k.startswith("mixer_")), key=lambda k: int(k[6:])):
        logits = inter[layer][module]["__call__"][0].astype(jnp.float32)
        B, T = x_BT.shape
        out.append(jax.nn.log_sigmoid(logits).reshape(B, T, heads, -1) / tau)
    return out


def count(model, params_R, x_BT, args, heads: int, bound: float) -> list[dict]:
    """Per run and layer: fraction of extreme tiles per chunk size, and decay quantiles."""
    import jax
    import numpy as np
    rows = []
    R = jax.tree.leaves(params_R)[0].shape[0]
    for r in range(R):
        params = jax.tree.map(lambda a, r=r: a[r], params_R)
        for layer, g in enumerate(layer_gates(model, params, x_BT, args.model, heads)):
            row = {"run": r, "layer": layer}
            for C in args.chunk:
                d = np.asarray(chunk_decays(g, C))
                row[f"extreme_C{C}"] = float(np.mean(d > bound))
                row[f"decay_C{C}_p50"] = float(np.percentile(d, 50))
                row[f"decay_C{C}_p99"] = float(np.percentile(d, 99))
            row["g_min"] = float(np.min(np.asarray(g)))
            rows.append(row)
    return rows


def main(argv=None) -> int:
    import jax.numpy as jnp
    from experiments import mqar_authors as ma
    from experiments.mqar_authors_train import held_out_set
    from pallas_kernels.chunk_math import MAX_CHUNK_DECAY

    args, margs = parse_args(argv)
    t0 = time.perf_counter()
    width = margs.widths[0]
    model = ma.build(args.model, width, margs)
    lrs, run_seeds = ma.run_grid(margs)
    init_params, opt_state = ma.init_runs(model, margs, list(range(margs.seeds)), run_seeds)
    saved = ma.load_cell_state(args.state)
    if saved is None:
        raise SystemExit(f"no state at {args.state}.state.*")
    identity = ma.state_identity(args.model, width, margs, lrs, run_seeds)
    (params, _), step, *_ = ma.restore_cell(args.state, saved, identity,
                                             (init_params, opt_state))
    test = held_out_set(margs)
    x = jnp.asarray(test.inputs[:args.rows])
    heads = {"gla": 2, "gsa": 4}[args.model]   # the authors' MQAR mixers (mqar_models.py)
    result = {"tag": args.tag, "state": args.state, "model": args.model, "width": width,
              "lrs": lrs, "run_seeds": run_seeds, "step": int(step),
              "epochs": step / ma.steps_per_epoch(margs), "rows": args.rows,
              "bound": MAX_CHUNK_DECAY, "chunks": args.chunk,
              "trained": count(model, params, x, args, heads, MAX_CHUNK_DECAY),
              "init": count(model, init_params, x, args, heads, MAX_CHUNK_DECAY),
              "elapsed_s": time.perf_counter() - t0}
    common.write_and_print(args.tag, "gate_extremes", result, markdown(result),
                           out_dir=args.out_dir)
    return 0


def markdown(r: dict) -> str:
    C = r["chunks"]
    head = ("| state | run (lr, seed) | layer | " + " | ".join(f"extreme tiles C={c}" for c in C)
            + f" | max decay per C={C[0]} chunk p50 / p99 | min g |")
    lines = [f"# Gate decays per kernel chunk: {r['model'].upper()} D={r['width']} "
             f"({r['tag']})", "",
             f"A tile (row, head, chunk) leaves the kernels' fast intra-chunk path when some "
             f"gated channel decays by more than {r['bound']:g} (natural log) over the chunk; "
             f"it loops over positions only if a 16-step sub-chunk does too (column C=16), "
             f"else it takes the sub-chunk tier. "
             f"Trained state: {r['state']} at epoch {r['epochs']:.1f}; {r['rows']} held-out "
             f"rows.", "", head, "|" + "---|" * (5 + len(C))]
    for which in ("init", "trained"):
        for row in r[which]:
            lr, seed = r["lrs"][row["run"]], r["run_seeds"][row["run"]]
            cells = " | ".join(f"{100 * row[f'extreme_C{c}']:.1f}%" for c in C)
            lines.append(f"| {which} | {lr:g}, {seed} | {row['layer']} | {cells} | "
                         f"{row[f'decay_C{C[0]}_p50']:.1f} / {row[f'decay_C{C[0]}_p99']:.1f} | "
                         f"{row['g_min']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

"""Compile time of the train step with the layers scanned (`model.scan_layers`, one nn.scan over
the blocks) and unscanned (a list of L blocks), and the train step's tokens/s both ways.

    python experiments/compile_time.py --tag h100                      # both parts
    python experiments/compile_time.py --tag h100 --kinds compile      # compile times only
    python experiments/compile_time.py --tag cpu --smoke               # tiny CPU check

compile: for each preset of --presets (default gsa-1.3b, gsa-340m), the project's jitted train
  step (steps.make_train_step: forward, backward, clip + AdamW; compute --dtype, f32 params,
  remat --remat) lowered and compiled for the abstract state and a [B, T] batch, each way.
  Wall times of `lower` and of `compile`; nothing runs. The persistent compilation cache is off,
  and each case builds a new jitted function, so every compile is a real one.
train: for --train-preset (default gsa-340m), the same step run on the device: the unscanned
  model's initial weights, and the same weights stacked for the scanned one
  (gsa_jax.layer_layout), so both runs compute the same losses; --warmup steps (the
  first compiles), then the median of --steps timed steps (each waited for), as tokens/s.

Results: `<out>/compile_time_<tag>.{json,md}` with the machine, versions and command
(experiments/common.write_results).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from experiments import common  # noqa: E402

NAME = "compile_time"
KINDS = ("compile", "train")
SMOKE = dict(presets=["gsa-tiny"], train_preset="gsa-tiny", layers=2, batch=2, seq_len=64,
             steps=2, warmup=1, dtype="float32")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tag", required=True, help="results name: compile_time_<tag>.{json,md}")
    p.add_argument("--out", default=None, help="results directory (default experiments/results)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                   help="parts to run: compile (lower + compile times), train (tokens/s)")
    p.add_argument("--presets", nargs="+", default=["gsa-1.3b", "gsa-340m"],
                   help="models whose train step is compiled")
    p.add_argument("--train-preset", default="gsa-340m", help="model of the timed train steps")
    p.add_argument("--layers", type=int, default=None, help="override the presets' depth L")
    p.add_argument("--batch", type=int, default=8, help="B, sequences per step")
    p.add_argument("--seq-len", type=int, default=2048, help="T, tokens per sequence")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype (params float32)")
    p.add_argument("--remat", default="none", help="remat policy: none | full | save_dots | "
                   "minimal")
    p.add_argument("--scan-unroll", type=int, nargs="+", default=[1],
                   help="train: time the scanned step at each of these model.scan_unroll "
                        "(layers per loop iteration)")
    p.add_argument("--steps", type=int, default=10, help="timed train steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed train steps before them")
    p.add_argument("--smoke", action="store_true",
                   help="tiny CPU sizes (gsa-tiny, 2 layers, B=2, T=64, 2 steps) unless given")
    args = p.parse_args(argv)
    if args.smoke:
        common.apply_smoke_sizes(p, args, SMOKE)
    return args


def model_config(args, preset: str, scan: bool, unroll: int = 1):
    from gsa_jax.models import get_preset
    changes = dict(scan_layers=scan, scan_unroll=unroll, dtype=args.dtype,
                   param_dtype="float32", remat=args.remat)
    if args.layers:
        changes["num_layers"] = args.layers
    cfg = get_preset(preset, **changes)
    if scan and not cfg.scanned:
        raise ValueError(f"{preset} mixes mixers: its layers cannot be scanned")
    return cfg


def _setup(cfg):
    """(model, optimizer, state layout, jitted train step, mesh) of a config."""
    from gsa_jax import sharding as shd
    from gsa_jax import steps
    from gsa_jax.models import CausalLM
    from gsa_jax.optim import OptimConfig, make_optimizer
    mesh = shd.make_mesh(shd.MeshConfig())
    model = CausalLM(cfg)
    tx, schedule = make_optimizer(OptimConfig(), 1000)
    layout = steps.state_layout(model, tx, mesh)
    return model, tx, layout, steps.make_train_step(model, tx, schedule, layout, mesh), mesh


def _abstract_batch(B: int, T: int, mesh):
    import jax
    import jax.numpy as jnp
    from gsa_jax import sharding as shd
    from gsa_jax import steps
    sharding = shd.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct((B, T), jnp.float32 if k == "mask" else jnp.int32,
                                    sharding=sharding) for k in steps.BATCH_KEYS}


def compile_case(args, preset: str, scan: bool) -> dict[str, Any]:
    """Lower + compile wall times of one train step (nothing is allocated or run)."""
    from gsa_jax.models import count_params
    cfg = model_config(args, preset, scan)
    _, _, layout, step, mesh = _setup(cfg)
    batch = _abstract_batch(args.batch, args.seq_len, mesh)
    t0 = time.perf_counter()
    lowered = step.lower(layout.abstract, batch)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"part": "compile", "preset": preset, "layers": cfg.num_layers, "scan": scan,
            "params": count_params(cfg), "lower_s": t1 - t0, "compile_s": t2 - t1,
            "total_s": t2 - t0}


def _random_batch(args, vocab: int, mesh) -> dict:
    import numpy as np
    from gsa_jax import steps
    rng = np.random.default_rng(0)
    rows = rng.integers(0, vocab, (args.batch, args.seq_len + 1)).astype(np.int32)
    host = {"tokens": rows[:, :-1], "targets": rows[:, 1:],
            "segment_ids": np.zeros((args.batch, args.seq_len), np.int32),
            "mask": np.ones((args.batch, args.seq_len), np.float32)}
    return steps.device_batch(host, mesh)


def train_cases(args) -> list[dict[str, Any]]:
    """Timed train steps of --train-preset unscanned, then scanned with the same weights."""
    import jax
    from gsa_jax import sharding as shd
    from gsa_jax import steps
    from gsa_jax import layer_layout
    rows = []
    initial = None
    for scan, unroll in [(False, 1)] + [(True, u) for u in args.scan_unroll]:
        cfg = model_config(args, args.train_preset, scan, unroll)
        model, tx, layout, step, mesh = _setup(cfg)
        if initial is None:
            state = steps.init_state(model, tx, 0, layout, mesh)
            initial = jax.device_get(state)  # host copy: the step donates its input state
        else:
            with shd.sharding_context(mesh):
                state = jax.device_put(layer_layout.to_scanned(initial), layout.shardings)
        batch = _random_batch(args, cfg.vocab_size, mesh)
        losses, times = [], []
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            state, metrics = step(state, batch)
            loss = float(metrics["loss"])  # waits for the step
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
            losses.append(loss)
        median = statistics.median(times) if times else float("nan")
        rows.append({"part": "train", "preset": args.train_preset, "layers": cfg.num_layers,
                     "scan": scan, "unroll": unroll if scan else None,
                     "B": args.batch, "T": args.seq_len,
                     "step_ms_median": 1e3 * median,
                     "tokens_per_s": args.batch * args.seq_len / median,
                     "losses": losses})
        del state
    return rows


def markdown(record: dict) -> str:
    c = record["config"]
    lines = [f"# Compile time and throughput, scanned vs unscanned layers ({record['tag']})", "",
             f"Train step (forward + backward + clip/AdamW), batch {c['batch']} x {c['seq_len']} "
             f"tokens, compute {c['dtype']}, f32 params, remat {c['remat']}."]
    comp = [r for r in record["rows"] if r["part"] == "compile"]
    if comp:
        lines += ["", "## Compile (lower + compile wall time, s)", "",
                  common.markdown_table(
                      ["preset", "layers", "params", "layers scanned", "lower s", "compile s",
                       "total s"],
                      [[r["preset"], r["layers"], f"{r['params'] / 1e6:.3g}M",
                        "yes" if r["scan"] else "no", common.fmt(r["lower_s"]),
                        common.fmt(r["compile_s"]), common.fmt(r["total_s"])] for r in comp])]
        for preset in dict.fromkeys(r["preset"] for r in comp):
            by = {r["scan"]: r["total_s"] for r in comp if r["preset"] == preset}
            if True in by and False in by and by[True] > 0:
                lines.append(f"\n{preset}: scanned compiles {by[False] / by[True]:.1f}x faster "
                             f"({common.fmt(by[False])} s -> {common.fmt(by[True])} s).")
    train = [r for r in record["rows"] if r["part"] == "train"]
    if train:
        lines += ["", f"## Train steps ({c['warmup']} warm-up, median of {c['steps']})", "",
                  common.markdown_table(
                      ["preset", "layers scanned", "step ms", "tokens/s", "first loss",
                       "last loss"],
                      [[r["preset"], (f"yes (unroll {r['unroll']})"
                                      if r["scan"] and r.get("unroll", 1) != 1
                                      else "yes" if r["scan"] else "no"),
                        common.fmt(r["step_ms_median"], 1), f"{r['tokens_per_s']:,.0f}",
                        common.fmt(r["losses"][0], 4), common.fmt(r["losses"][-1], 4)]
                       for r in train])]
        lines.append("\nBoth start from the same weights (stacked for the scanned model), so "
                     "their losses agree up to float rounding.")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if args.smoke:
        common.fast_cpu_compile()  # before jax starts its backend
    import jax
    jax.config.update("jax_enable_compilation_cache", False)  # every compile is a real one
    common.ensure_importable()
    rows: list[dict] = []
    if "compile" in args.kinds:
        for preset in args.presets:
            for scan in (False, True):
                rows.append(compile_case(args, preset, scan))
                print(f"compile {preset} scan={scan}: {rows[-1]['total_s']:.1f} s", flush=True)
    if "train" in args.kinds:
        rows += train_cases(args)
    config = {k: getattr(args, k) for k in ("kinds", "presets", "train_preset", "layers",
                                            "batch", "seq_len", "dtype", "remat", "steps",
                                            "warmup", "smoke")}
    record = {"benchmark": NAME, "tag": args.tag, "config": config, "rows": rows}
    written = common.write_and_print(args.tag, NAME, record, markdown(record), out_dir=args.out,
                                     command=common.command_line(argv, __file__))
    return {**record, "paths": {k: str(v) for k, v in written.items()}}


if __name__ == "__main__":
    main()

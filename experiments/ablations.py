"""The GSA ablations of the paper's Table 2 at a size one GPU trains in about a minute per
variant: validation perplexity of GSA against its variants, over several seeds.

    python experiments/ablations.py --tag h100          # the real size (see REAL below)
    python experiments/ablations.py --smoke --tag cpu    # tiny, a CPU check of the pipeline

Variants (model-config changes from the default GSA: data-dependent gate, softmax between the
passes, 64 slots):

    gsa               the default
    abc               gate="none": no forget gate (ABC)
    data_independent  gate="data_independent": a learned per-slot decay, not a function of x
    swish|relu|relu2  slot_nonlinearity instead of softmax
    slots32|slots128  num_slots 32 / 128 (64 is the default row)

Each (variant, seed) is one run of the project's trainer, `gsa_jax.train.train(config)`, on the
embedded default corpus (the Python standard library's sources, byte-level), with the config of
configs/tiny.yaml plus the overrides below. For a seed s every variant gets the same
initialisation seed and the same data order (config.seed = data.seed = s), hence the same training
tokens, and all are scored on the same validation windows (the first eval.batches batches of the
validation split). Reported: validation perplexity (exp of the mean per-byte cross-entropy) per
run, and per variant the mean ± sample standard deviation over seeds and the change from the
default GSA, beside the paper's Table 2 (340M parameters on 10B SlimPajama tokens: perplexities
that are not comparable in value with byte-level ones here; compare the ordering).

Results: experiments/results/ablations_<tag>.json / .md / .png (bar plot), rewritten after every
run. Run directories (checkpoints, metrics.jsonl) go under --work-dir (default a temporary
directory, removed at the end); with --work-dir an interrupted sweep resumes where it stopped.
The persistent compilation cache under the work directory lets the second seed of a variant skip
XLA's compile. Split a sweep over commands with --variants and --merge. `--jobs N` trains N runs
at once, each in its own process with 0.9/N of the device's memory: these models use a small
part of a GPU, and a first H100 try one run at a time (beside two other experiments) took
100-150 s a run, mostly compile and start-up.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common, harness  # noqa: E402

# name: (label, model config changes from the default GSA)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "gsa": ("GSA (default)", {}),
    "abc": ("w/o gate (ABC)", {"gate": "none"}),
    "data_independent": ("data-independent decay", {"gate": "data_independent"}),
    "swish": ("softmax -> Swish", {"slot_nonlinearity": "swish"}),
    "relu": ("softmax -> ReLU", {"slot_nonlinearity": "relu"}),
    "relu2": ("softmax -> ReLU²", {"slot_nonlinearity": "relu2"}),
    "slots32": ("32 slots", {"num_slots": 32}),
    "slots128": ("128 slots", {"num_slots": 128}),
}

# The paper's Table 2 (340M, 10B SlimPajama tokens), perplexity per row. PAPER.md does not record
# the numbers and they could not be verified here: fill them in from the paper (arXiv 2409.07146
# v2, Table 2); None prints as "-".
PAPER_PPL: dict[str, Any] = {name: None for name in VARIANTS}

# The real size: 8 variants x 2 seeds; with --jobs 4 on one H100 about 5-8 minutes (estimate
# from 100-150 s a run measured one at a time beside other jobs; each run's time is recorded).
# 16M training tokens per run (about half an epoch of the corpus), validation on
# 64 x 32 x 512 = 1M tokens.
REAL = dict(seeds=[0, 1], steps=1000, overrides=[
    "model.hidden_size=256", "model.num_layers=4", "model.num_heads=4", "model.num_slots=64",
    "model.dtype=bfloat16", "data.seq_len=512", "data.batch_size=32", "optim.lr=2e-3",
    "optim.warmup_steps=100", "eval.batches=64",
])
# A CPU check (< 60 s on 2 cores): 1 layer, a few steps, a small corner of the stdlib.
SMOKE = dict(seeds=[0, 1], steps=3, overrides=[
    "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_slots=64",
    "data.seq_len=32", "data.batch_size=4", "optim.warmup_steps=1", "eval.batches=2",
    "data.val_fraction=0.25", "data.stdlib_root={stdlib}/email",
])
# Always: evaluate once at the end, no intermediate checkpoints, no sample, no TensorBoard.
FIXED = ["eval.every=0", "checkpoint.every=0", "sample.max_new_tokens=0",
         "logging.tensorboard=false"]


def parse_args(argv=None) -> argparse.Namespace:
    p = common.argument_parser(__doc__)
    p.add_argument("--smoke", action="store_true", help="CPU-sized run")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default 1000; smoke 3)")
    p.add_argument("--config", default=str(common.ROOT / "configs" / "tiny.yaml"),
                   help="base YAML config (default configs/tiny.yaml)")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="more config overrides, after the size's (repeatable)")
    p.add_argument("--work-dir", default=None,
                   help="run directories and compile cache (default: a temporary directory, "
                        "removed at the end); an existing one resumes its runs")
    p.add_argument("--merge", action="store_true",
                   help="keep the runs of the existing results of this tag that this command "
                        "does not redo (settings must match)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once, each in its own process sharing the device (its memory "
                        "split evenly); the models are small, so a GPU has room for several")
    # Internal: the one run a worker process does, "<variant>:<seed>".
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be positive")
    size = SMOKE if args.smoke else REAL
    args.seeds = size["seeds"] if args.seeds is None else args.seeds
    args.steps = size["steps"] if args.steps is None else args.steps
    if args.steps < 1:
        p.error("--steps must be positive")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds must be distinct, got {args.seeds}")
    from gsa_jax.data import stdlib
    args.overrides = [o.format(stdlib=stdlib.stdlib_root()) for o in size["overrides"]]
    args.overrides += FIXED + list(args.extra)
    return args


def run_config(args, variant: str, seed: int, work_dir: pathlib.Path):
    """The trainer config of one (variant, seed)."""
    from gsa_jax.config import load_config
    changes = [f"model.{k}={v}" for k, v in VARIANTS[variant][1].items()]
    overrides = args.overrides + changes + [
        f"steps={args.steps}", f"seed={seed}", f"data.seed={seed}",
        f"run_dir={work_dir / f'{variant}_seed{seed}'}",
        f"logging.progress={str(not args.no_progress).lower()}"]
    return load_config(args.config, overrides)


def settings(args) -> dict[str, Any]:
    """What makes runs comparable (checked by --merge): the base config and overrides."""
    return {"config": os.path.relpath(args.config, common.ROOT)
            if args.config.startswith(str(common.ROOT)) else args.config,
            "overrides": args.overrides, "steps": args.steps}


def summarize(runs: list[dict]) -> list[dict]:
    """Per variant (in VARIANTS order): mean, sample std, min, max of the validation perplexity
    over seeds, and the mean's change from the default GSA (same seeds)."""
    out = []
    for name in VARIANTS:
        ppl = [r["val_ppl"] for r in runs if r["variant"] == name]
        if not ppl:
            continue
        out.append({"variant": name, "label": VARIANTS[name][0], "seeds": len(ppl),
                    "ppl_mean": statistics.fmean(ppl),
                    "ppl_std": statistics.stdev(ppl) if len(ppl) > 1 else None,
                    "ppl_min": min(ppl), "ppl_max": max(ppl), "paper_ppl": PAPER_PPL[name]})
    base = next((s for s in out if s["variant"] == "gsa"), None)
    for s in out:
        s["delta_vs_gsa"] = None if base is None else s["ppl_mean"] - base["ppl_mean"]
    return out


def markdown(record: dict) -> str:
    cfg = record["model"]
    lines = [f"# Ablations of GSA, Table 2 ({record['tag']})", "",
             f"Byte-level LM on the embedded stdlib corpus: L = {cfg['num_layers']}, width "
             f"{cfg['hidden_size']}, {cfg['num_heads']} heads, {cfg['num_slots']} slots, "
             f"{record['params_gsa']:,} parameters (default GSA); {record['steps']} steps x "
             f"{record['tokens_per_step']:,} tokens = "
             f"{record['steps'] * record['tokens_per_step']:,} training tokens "
             f"per run, seeds {record['seeds']} (same init seed and data order for every "
             f"variant); validation perplexity per byte on {record['val_tokens']:,} validation "
             f"tokens, mean ± sample std over seeds.", "",
             "The paper's column: 340M parameters, 10B SlimPajama tokens, Mistral tokenizer: "
             "perplexities per token, not comparable in value with these per-byte ones; compare "
             "the direction of each change from GSA."]
    if all(v is None for v in PAPER_PPL.values()):
        lines.append("(The paper's numbers are not filled in yet: `PAPER_PPL` in "
                     "experiments/ablations.py.)")
    rows = []
    for s in record["summary"]:
        spread = f" ± {s['ppl_std']:.3f}" if s["ppl_std"] is not None else ""
        delta = ("" if s["variant"] == "gsa" else "-" if s["delta_vs_gsa"] is None
                 else f"{s['delta_vs_gsa']:+.3f}")  # no GSA row yet: a sweep in progress
        rows.append([s["label"], f"{s['ppl_mean']:.3f}{spread}", delta,
                     f"{s['ppl_min']:.3f} – {s['ppl_max']:.3f}", s["seeds"],
                     common.fmt(s["paper_ppl"], 2)])
    lines += ["", common.markdown_table(
        ["variant", "val ppl (ours)", "Δ vs GSA", "min – max", "seeds", "paper ppl (Table 2)"],
        rows, "lrrrrr")]
    lines += common.notes_lines(record)
    if record.get("failures"):
        lines += ["", "Failed runs (no row above):", ""] + [
            f"- {f['variant']} seed {f['seed']}: {f['error']}" for f in record["failures"]]
    per_run = [[r["variant"], r["seed"], f"{r['val_ppl']:.3f}", f"{r['val_loss']:.4f}",
                f"{r['train_loss']:.4f}", f"{r['params']:,}", f"{r['time_s']:.0f}"]
               for r in record["runs"]]
    lines += ["", "Runs:", "", common.markdown_table(
        ["variant", "seed", "val ppl", "val loss", "last train loss", "params", "time s"],
        per_run, "lrrrrrr")]
    return "\n".join(lines)


def plot(record: dict):
    plt = common.pyplot()
    summary = record["summary"]
    if plt is None or not summary:
        return None
    fig, ax = plt.subplots(figsize=(1.1 * len(summary) + 2, 3.6))
    x = range(len(summary))
    means = [s["ppl_mean"] for s in summary]
    errs = [s["ppl_std"] or 0.0 for s in summary]
    ax.bar(x, means, yerr=errs, capsize=4,
           color=["tab:blue" if s["variant"] == "gsa" else "tab:gray" for s in summary])
    for i, r in enumerate(summary):   # the seeds themselves
        pts = [run["val_ppl"] for run in record["runs"] if run["variant"] == r["variant"]]
        ax.plot([i] * len(pts), pts, "k.", ms=4)
    ax.set_xticks(list(x), [s["variant"] for s in summary], rotation=30, ha="right")
    low, high = min(means) - 2 * max(errs + [0.01]), max(means) + 2 * max(errs + [0.01])
    ax.set_ylim(max(0.0, low - 0.1 * (high - low)), high + 0.1 * (high - low))
    ax.set_ylabel("validation perplexity (per byte)")
    ax.set_title(f"GSA ablations ({record['tag']}), mean ± std over {len(record['seeds'])} seeds")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def one_run(args, variant: str, seed: int, work_dir: pathlib.Path) -> dict:
    """Train one (variant, seed) with the project's trainer: its row of the report."""
    from gsa_jax.models import count_params
    from gsa_jax.train import train
    config = run_config(args, variant, seed, work_dir)
    t0 = time.perf_counter()
    out = train(config, quiet=args.no_progress)
    return {"variant": variant, "seed": seed, "val_loss": out["val_loss"],
            "val_ppl": out["val_ppl"], "val_bpt": out["val_bpt"],
            "val_tokens": out["val_tokens"], "train_loss": out.get("loss", math.nan),
            "params": count_params(config.model), "time_s": round(time.perf_counter() - t0, 1)}


def run_in_worker(argv, variant: str, seed: int, work_dir: pathlib.Path, jobs: int) -> dict:
    """`one_run` in a fresh interpreter (for --jobs): the device memory split `jobs` ways."""
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / jobs:.3f}")
    out = harness.run_worker(__file__, [*argv, "--work-dir", str(work_dir), "--worker",
                                        f"{variant}:{seed}"], env=env, tail_chars=1500)
    if out.payload is None:
        raise RuntimeError(f"run {variant} seed {seed} failed (exit {out.returncode}): "
                           f"{out.tail}")
    return out.payload


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.smoke:
        common.fast_cpu_compile()
    if args.worker:  # one run of a --jobs sweep, in the driver's --work-dir
        variant, seed = args.worker.split(":")
        with harness.work_dir(args.work_dir, "gsa_ablations_") as work_dir:
            harness.emit(one_run(args, variant, int(seed), work_dir))
        return 0
    with harness.work_dir(args.work_dir, "gsa_ablations_") as work_dir:
        tag, record = sweep(args, argv, work_dir)
    common.write_and_print(tag, "ablations", record, markdown(record), fig=plot(record),
                           command=record["commands"][-1], out_dir=args.out_dir)
    return 0


def sweep(args, argv, work_dir: pathlib.Path) -> tuple[str, dict]:
    """Every (variant, seed) of the command, its report rewritten after each: (tag, record)."""
    import jax
    from gsa_jax.models import count_params

    tag = args.tag or jax.default_backend()
    todo = [(v, s) for v in args.variants for s in args.seeds]
    previous = (harness.merge_base(tag, "ablations", args.out_dir, settings(args),
                                   field="settings") if args.merge else None)
    runs = [r for r in (previous or {}).get("runs", []) if (r["variant"], r["seed"]) not in todo]
    base = run_config(args, "gsa", args.seeds[0], work_dir)
    record = {"tag": tag, "settings": settings(args), "seeds": sorted({*args.seeds,
              *(r["seed"] for r in runs)}), "steps": args.steps,
              "tokens_per_step": base.data.batch_size * base.data.seq_len,
              "model": base.model.to_dict(), "params_gsa": count_params(base.model),
              "paper_ppl": PAPER_PPL, "runs": runs,
              "commands": harness.merged_commands(previous, common.command_line(argv, __file__)),
              "jobs": args.jobs, "summary": summarize(runs),
              "val_tokens": (previous or {}).get("val_tokens", 0)}
    print(f"GSA ablations: {len(todo)} runs ({', '.join(args.variants)} x seeds {args.seeds}), "
          f"{args.steps} steps each, {args.jobs} at a time, work dir {work_dir}", flush=True)
    start = time.perf_counter()

    done_before = len(runs)

    def finished(row):  # a run's row as it ends (in any order with --jobs): report rewritten
        runs.append(row)
        print(f"[{len(runs) - done_before}/{len(todo)}] {row['variant']:>16} seed "
              f"{row['seed']}: val ppl {row['val_ppl']:.3f} (loss {row['val_loss']:.4f}) in "
              f"{row['time_s']:.0f} s", flush=True)
        runs.sort(key=lambda r: (list(VARIANTS).index(r["variant"]), r["seed"]))
        record.update(summary=summarize(runs), val_tokens=row["val_tokens"],
                      elapsed_s=round(time.perf_counter() - start, 1))
        common.write_results(tag, "ablations", record, markdown(record),
                             command=record["commands"][-1], out_dir=args.out_dir)

    def failed(variant, seed, error):
        lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
        last = ([ln for ln in lines if "Error:" in ln] or lines or ["?"])[-1]
        record.setdefault("failures", []).append(
            {"variant": variant, "seed": seed, "error": last[:300]})
        print(f"run {variant} seed {seed} FAILED: {last[:300]}", flush=True)
        if runs:  # else the report is first written by the next finished run
            common.write_results(tag, "ablations", record, markdown(record),
                                 command=record["commands"][-1], out_dir=args.out_dir)

    # Seed order first (every variant's first seed, then the second ones), so that a sweep cut
    # short has each variant once rather than some variants twice.
    ordered = sorted(todo, key=lambda run: (args.seeds.index(run[1]),
                                            args.variants.index(run[0])))
    if args.jobs == 1:  # in this process (the trainer's signal handlers want the main thread)
        execute = lambda run: one_run(args, *run, work_dir)  # noqa: E731
    else:  # each run in its own worker process; one run's failure ends no other run
        execute = lambda run: run_in_worker(argv, *run, work_dir, args.jobs)  # noqa: E731
    for run, row, error in harness.run_cases(ordered, execute, args.jobs,
                                             catch=() if args.jobs == 1 else (RuntimeError,)):
        if error is None:
            finished(row)
        else:
            failed(*run, error)
    return tag, record


if __name__ == "__main__":
    sys.exit(main())

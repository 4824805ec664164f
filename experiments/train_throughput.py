"""Train a model with the project's trainer and record its throughput, MFU and loss curve.

    python experiments/train_throughput.py --config configs/gsa-340m-stdlib.yaml --tag h100
    python experiments/train_throughput.py --config configs/tiny.yaml --tag cpu --set steps=40

Runs `gsa_jax.train.train` (fresh run directory unless --resume), then reads the run's
metrics.jsonl: tokens/s and MFU are the medians of the logged intervals (the compiling first step
is never timed; intervals broken by evaluation or checkpoints restart their timer), the peak
device memory is the backend's `peak_bytes_in_use` where it reports one. With --profile FIRST
LAST the trainer traces those steps (logging.profile_steps) and the report adds where their
device time went, per category and per op (experiments/profile_summary.py). Results:
experiments/results/train_throughput_<tag>.json and .md (with the machine, versions, command and
config; experiments/common.write_results).
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import shutil
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from experiments import common, harness  # noqa: E402


def summarize(records: list[dict]) -> dict:
    """Medians of the timed train records, first/last loss and the final validation loss."""
    timed = [r for r in records if "tokens_per_s" in r]
    losses = [r for r in records if "loss" in r and "event" not in r]
    vals = [r for r in records if "val_loss" in r]
    out = {"logged_intervals": len(timed)}
    if timed:
        out["tokens_per_s_median"] = statistics.median(r["tokens_per_s"] for r in timed)
        out["tokens_per_s_max"] = max(r["tokens_per_s"] for r in timed)
        if all("mfu" in r for r in timed):
            out["mfu_median"] = statistics.median(r["mfu"] for r in timed)
    if losses:
        out["loss_first"], out["loss_last"] = losses[0]["loss"], losses[-1]["loss"]
        out["loss_curve"] = [[r["step"], r["loss"]] for r in losses]
    if vals:
        out["val_loss_last"], out["val_ppl_last"] = vals[-1]["val_loss"], vals[-1]["val_ppl"]
    return out


def profile_report(run_dir, steps, config, summary) -> dict:
    """The traced steps' device time per category (experiments/profile_summary.py); a step's
    wall time from the run's median tokens/s."""
    from experiments import profile_summary as ps
    first, last = steps
    trace = ps.find_trace(pathlib.Path(run_dir) / "profile")
    ops, source = ps.device_events(ps.load_events(trace))
    tokens = summary.get("tokens_per_s_median")
    step_ms = (config.data.batch_size * config.data.seq_len / tokens * 1e3) if tokens else None
    return {"first": first, "last": last, "trace": str(trace), "source": source,
            "summary": ps.summarize(ops, last - first + 1, step_ms)}


def markdown(report: dict) -> str:
    s, c = report["summary"], report["config"]
    m = c["model"]
    lines = [f"# train_throughput ({report['tag']})", "",
             f"Model: mixer {m.get('mixer')}, D={m.get('hidden_size')}, "
             f"L={m.get('num_layers')}, vocab {m.get('vocab_size')}, {report['params']:,} "
             f"parameters, compute {m.get('dtype')}, params {m.get('param_dtype')}; "
             f"batch {c['data']['batch_size']} x {c['data']['seq_len']} tokens, "
             f"{c['steps']} steps, mesh {c['mesh']}.", "",
             "| tokens/s (median) | tokens/s (max) | MFU (median) | peak memory GiB | "
             "loss first → last | val loss | wall s |",
             "|---:|---:|---:|---:|---|---:|---:|"]
    mfu = f"{100 * s['mfu_median']:.1f}%" if "mfu_median" in s else "-"
    peak = (f"{report['peak_bytes'] / 2**30:.1f}" if report.get("peak_bytes") else "-")
    val = f"{s['val_loss_last']:.3f}" if "val_loss_last" in s else "-"
    lines.append(f"| {s.get('tokens_per_s_median', float('nan')):,.0f} | "
                 f"{s.get('tokens_per_s_max', float('nan')):,.0f} | {mfu} | {peak} | "
                 f"{s.get('loss_first', float('nan')):.3f} → {s.get('loss_last', float('nan')):.3f}"
                 f" | {val} | {report['wall_s']:.0f} |")
    lines += ["", "MFU counts 6·N + attention/mixer FLOPs per token (gsa_jax/flops.py) against "
              "the device's dense bf16 peak."]
    if report.get("profile"):
        from experiments.profile_summary import markdown_lines
        prof = report["profile"]
        lines += ["", f"## Profile of steps {prof['first']}-{prof['last']}", ""]
        lines += markdown_lines(prof["summary"], prof["source"])
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = common.argument_parser(__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", action="store_true", help="keep the run directory's checkpoints")
    p.add_argument("--profile", type=int, nargs=2, metavar=("FIRST", "LAST"), default=None,
                   help="trace train steps FIRST..LAST (after the first, which compiles) and "
                        "report where their device time went")
    args = p.parse_args(argv)
    if args.profile is not None:
        first, last = args.profile
        if not 2 <= first <= last:
            p.error(f"--profile wants 2 <= FIRST <= LAST (step 1 compiles), got {first} {last}")
        args.overrides.append(f"logging.profile_steps=[{first},{last}]")
    import jax

    from gsa_jax.config import load_config
    from gsa_jax.train import train

    config = load_config(args.config, args.overrides)
    if args.profile is not None and args.profile[1] > config.steps:
        p.error(f"--profile {args.profile[0]} {args.profile[1]}: the run has only "
                f"{config.steps} steps")
    run_dir = pathlib.Path(config.run_dir)
    if not args.resume and run_dir.exists():
        shutil.rmtree(run_dir)  # a throughput run starts fresh
    t0 = datetime.datetime.now(datetime.timezone.utc)
    final = train(config)
    wall = (datetime.datetime.now(datetime.timezone.utc) - t0).total_seconds()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    start = next((r for r in records if r.get("event") in ("start", "resume")), {})
    report = {
        "tag": args.tag or jax.default_backend(),
        "command": common.command_line(argv, __file__),
        "config": config.to_dict(), "params": start.get("params"),
        "flops_per_token": start.get("flops_per_token"), "wall_s": wall,
        "peak_bytes": harness.peak_bytes(jax.devices()[0]),
        "summary": summarize(records), "sample": final.get("sample"),
    }
    if args.profile is not None:
        report["profile"] = profile_report(run_dir, args.profile, config, report["summary"])
    common.write_and_print(report["tag"], "train_throughput", report, markdown(report),
                           out_dir=args.out_dir)
    return report


if __name__ == "__main__":
    main()

"""T2R in miniature (the paper's Table 3 claim): a pretrained softmax Transformer converted into
GSA recovers its quality with little finetuning, better than GLA/RetNet conversions and far
better than GSA trained from scratch on the same tokens.

    python experiments/t2r_small.py --tag h100        # the real size (REAL below, ~8 min on H100)
    python experiments/t2r_small.py --smoke --tag cpu # tiny, a CPU check of the pipeline (< 60 s)

Runs, all with the project's trainer (`gsa_jax.train.train`) on the embedded default corpus
(the Python standard library's sources, byte-level), in this order:

    transformer   Transformer++ (softmax attention + RoPE, GQA) pretrained for P steps
    gsa_t2r       converted to GSA   (gsa_jax.convert: q/k/v/o, MLPs, norms, embeddings reused,
    gla_t2r       converted to GLA    new gate/norm parameters from scratch), then finetuned for
    retnet_t2r    converted to RetNet F steps each from `train(..., init_from=...)`
    gsa_scratch   the same GSA architecture from a random init, trained for the same F steps

Every finetune and the scratch run see the same F · B · T training tokens in the same order
(data.seed fixed); T2R runs use the finetuning learning rate, the scratch run the pretraining
recipe (its peak lr and warmup: what training from scratch needs). Validation perplexity per
byte on the same validation windows, every F/10 steps (P/10 in pretraining), starting at step 0
for the converted models (before any finetuning).

Results: experiments/results/t2r_small_<tag>.json / .md / .png (validation curves). Run
directories go under --work-dir (default: a temporary directory, removed at the end; an
existing one resumes its runs and reuses its converted checkpoints).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common, harness  # noqa: E402

RUNS = {  # name: (label, mixer, initialisation)
    "transformer": ("Transformer++ (pretrained)", "attention", "scratch"),
    "gsa_t2r": ("GSA from the Transformer (T2R)", "gsa", "t2r"),
    "gla_t2r": ("GLA from the Transformer (T2R)", "gla", "t2r"),
    "retnet_t2r": ("RetNet from the Transformer (T2R)", "retnet", "t2r"),
    "gsa_scratch": ("GSA from scratch", "gsa", "scratch"),
}

# The real size: 6 layers of width 256 (4 query / 2 key-value heads of 64, GQA as Mistral),
# T = 512, B = 32 (16K tokens per step). Estimate on one H100: ~4 min of steps (6000 in all)
# plus ~2 min of compiles and evaluations.
REAL = dict(model=dict(hidden_size=256, num_layers=6, attn_num_heads=4, attn_num_kv_heads=2),
            seq_len=512, batch_size=32, pretrain_steps=4000, finetune_steps=500,
            pretrain_lr=2e-3, pretrain_warmup=200, finetune_lr=1e-3, finetune_warmup=25,
            evals=10, eval_batches=32, stdlib_root=None, val_fraction=0.05)
# A CPU check (< 60 s on 2 cores): a small corner of the stdlib, a few steps.
SMOKE = dict(model=dict(hidden_size=32, num_layers=2, attn_num_heads=4, attn_num_kv_heads=2),
             seq_len=32, batch_size=4, pretrain_steps=12, finetune_steps=6,
             pretrain_lr=3e-3, pretrain_warmup=2, finetune_lr=1e-3, finetune_warmup=1,
             evals=2, eval_batches=2, stdlib_root="{stdlib}/email", val_fraction=0.25)
# The converted mixers' sizes beyond what conversion fixes (heads, head dims: the attention's).
TARGET_OVERRIDES = {"gsa": {"num_slots": 64}, "gla": {}, "retnet": {}}


def parse_args(argv=None) -> argparse.Namespace:
    p = common.argument_parser(__doc__)
    p.add_argument("--smoke", action="store_true", help="CPU-sized run")
    p.add_argument("--pretrain-steps", type=int, help="Transformer pretraining steps")
    p.add_argument("--finetune-steps", type=int,
                   help="steps of every finetune and of the scratch run")
    p.add_argument("--impl", default="auto", help="form of the gsa/gla/retnet ops (model.impl)")
    p.add_argument("--dtype", default="float32", help="compute dtype (model.dtype)")
    p.add_argument("--seed", type=int, default=0, help="init seed (all runs) and data order")
    p.add_argument("--work-dir", default=None,
                   help="run directories and compile cache (default: a temporary directory, "
                        "removed at the end); an existing one resumes its runs")
    p.add_argument("--no-progress", action="store_true", help="no printed progress lines")
    p.add_argument("--note", action="append", default=[],
                   help="a line for the report (how the run was made); repeatable")
    p.add_argument("--plot-only", action="store_true",
                   help="rewrite the .md/.png of --tag from its JSON (adding any --note)")
    args = p.parse_args(argv)
    if args.plot_only and not args.tag:
        p.error("--plot-only needs --tag (the report to read)")
    size = dict(SMOKE if args.smoke else REAL)
    for name in ("pretrain_steps", "finetune_steps"):
        if getattr(args, name) is not None:
            if getattr(args, name) < 1:
                p.error(f"--{name.replace('_', '-')} must be positive")
            size[name] = getattr(args, name)
    if size["stdlib_root"]:
        from gsa_jax.data import stdlib
        size["stdlib_root"] = size["stdlib_root"].format(stdlib=stdlib.stdlib_root())
    args.size = size
    return args


def base_model(args):
    """The Transformer++ that is pretrained (byte vocabulary: 257 ids, padded to 264)."""
    from gsa_jax.models import ModelConfig
    return ModelConfig(mixer="attention", vocab_size=264, impl=args.impl, dtype=args.dtype,
                       **args.size["model"])


def run_config(args, name: str, model, work_dir: pathlib.Path):
    """The trainer config of run `name` with model config `model`."""
    from gsa_jax.config import Config
    size = args.size
    pretrain = name == "transformer"
    steps = size["pretrain_steps"] if pretrain else size["finetune_steps"]
    t2r = RUNS[name][2] == "t2r"
    lr, warmup = ((size["finetune_lr"], size["finetune_warmup"]) if t2r else
                  (size["pretrain_lr"], size["pretrain_warmup"]))
    if name == "gsa_scratch":  # the pretraining warmup, as a share of its shorter schedule
        warmup = max(1, round(size["pretrain_warmup"] * steps / size["pretrain_steps"]))
    data = {"source": "stdlib", "seq_len": size["seq_len"], "batch_size": size["batch_size"],
            "val_fraction": size["val_fraction"], "seed": args.seed}
    if size["stdlib_root"]:
        data["stdlib_root"] = size["stdlib_root"]
    return Config.from_dict({
        "model": model.to_dict(), "run_dir": str(work_dir / name), "steps": steps,
        "seed": args.seed, "data": data,
        "optim": {"lr": lr, "warmup_steps": min(warmup, steps), "min_lr_ratio": 0.1,
                  "weight_decay": 0.01, "grad_clip": 1.0},
        "eval": {"every": max(1, steps // size["evals"]), "batches": size["eval_batches"]},
        "checkpoint": {"every": 0, "keep": 1},
        "logging": {"every": max(1, steps // 20), "progress": False, "tensorboard": False},
        "sample": {"max_new_tokens": 0}})


def curve(run_dir: pathlib.Path, tokens_per_step: int) -> list[dict]:
    """The validation records of a run's metrics.jsonl: step, tokens, val_loss, val_ppl."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "val_loss" in r:  # a step evaluated twice (a resumed run) keeps the last value
            out[r["step"]] = {"step": r["step"], "tokens": r["step"] * tokens_per_step,
                              "val_loss": r["val_loss"], "val_ppl": r["val_ppl"]}
    return [out[s] for s in sorted(out)]


def convert_pretrained(args, mixer: str, pre_dir: pathlib.Path, work_dir: pathlib.Path):
    """(target config, params checkpoint dir): the pretrained run converted to `mixer` (the
    path of `gsa-jax convert --run-dir`); an existing converted checkpoint is reused."""
    from gsa_jax import convert
    from gsa_jax.models import ModelConfig
    out = work_dir / f"converted_{mixer}"
    if (out / "model.yaml").is_file():
        import yaml
        return ModelConfig.from_dict(yaml.safe_load((out / "model.yaml").read_text())["model"]), out
    target, params, meta = convert.convert_run(pre_dir, mixer, seed=args.seed,
                                               **TARGET_OVERRIDES[mixer])
    convert.save_converted(out, params, target, meta)
    return target, out


def claim(runs: dict) -> dict:
    """The T2R claim checked on the final validation perplexities."""
    final = {name: r["final_val_ppl"] for name, r in runs.items()}
    t2r = {n: final[n] for n in ("gsa_t2r", "gla_t2r", "retnet_t2r") if n in final}
    out = {}
    if "gsa_t2r" in final and "gsa_scratch" in final:
        out["gsa_t2r_beats_scratch"] = final["gsa_t2r"] < final["gsa_scratch"]
    if len(t2r) == 3:
        out["gsa_best_conversion"] = min(t2r, key=t2r.get) == "gsa_t2r"
    if "transformer" in final and "gsa_t2r" in final:
        out["gsa_t2r_ppl_ratio_to_transformer"] = final["gsa_t2r"] / final["transformer"]
    return out


def markdown(record: dict) -> str:
    size, runs = record["size"], record["runs"]
    tok = record["tokens_per_step"]
    m = record["model"]
    lines = [f"# T2R in miniature ({record['tag']})", "",
             f"Byte-level LM on the embedded stdlib corpus. Transformer++: {m['num_layers']} "
             f"layers, width {m['hidden_size']}, {m['attn_num_heads']} query / "
             f"{m['attn_num_kv_heads'] or m['attn_num_heads']} key-value heads, pretrained "
             f"{size['pretrain_steps']} steps ({size['pretrain_steps'] * tok / 1e6:.1f}M tokens); "
             f"each conversion finetuned and GSA from scratch trained {size['finetune_steps']} "
             f"steps ({size['finetune_steps'] * tok / 1e6:.2f}M tokens, same data). Validation "
             f"perplexity per byte on {record.get('val_tokens') or '-'} validation tokens.", ""]
    rows = []
    base = runs.get("transformer", {}).get("final_val_ppl")
    for name, r in runs.items():
        start = r["curve"][0]["val_ppl"] if r["curve"] and r["curve"][0]["step"] == 0 else None
        ratio = r["final_val_ppl"] / base if base else None
        rows.append([r["label"], f"{r['steps']} x {tok:,}", common.fmt(start, 2),
                     common.fmt(r["final_val_ppl"], 3), common.fmt(ratio, 3),
                     f"{r['params']:,}", f"{r['time_s']:.0f}"])
    lines.append(common.markdown_table(
        ["model", "steps x tokens", "val ppl at step 0", "final val ppl", "/ Transformer",
         "params", "time s"], rows, "lrrrrrr"))
    c = record["claim"]
    if c:
        lines += ["", "Claim (paper, Table 3: GSA recovers the Transformer best): "
                  + "; ".join(f"{k} = {common.fmt(v, 3) if isinstance(v, float) else v}"
                              for k, v in c.items())]
    lines += [f"\nNote: {note}" for note in record.get("notes", [])]
    return "\n".join(lines)


def _unit(tokens: float) -> tuple[float, str]:
    return (1e6, "M") if tokens >= 1e6 else (1e3, "K")


def plot(record: dict):
    plt = common.pyplot()
    runs = record["runs"]
    if plt is None or not runs:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    size, tok = record["size"], record["tokens_per_step"]
    scale, unit = _unit(size["pretrain_steps"] * tok)
    if "transformer" in runs:
        pts = runs["transformer"]["curve"]
        left.plot([p["tokens"] / scale for p in pts], [p["val_ppl"] for p in pts], "k.-")
    left.set(xlabel=f"pretraining tokens ({unit})", ylabel="validation perplexity (per byte)",
             title="Transformer++ pretraining")
    scale, unit = _unit(size["finetune_steps"] * tok)
    # The converted models start (step 0, before finetuning) and GSA from scratch ends far
    # above the rest: the axis fits the T2R runs after their first finetuning steps (and the
    # Transformer); a label gives the value of a run's start or end when it is off the axis.
    t2r = [p["val_ppl"] for n in ("gsa_t2r", "gla_t2r", "retnet_t2r") if n in runs
           for p in runs[n]["curve"] if p["step"] > 0]
    top = None
    if t2r:
        low = min(t2r + [runs.get("transformer", {}).get("final_val_ppl", min(t2r))])
        high = max(t2r)
        top = high + 0.6 * (high - low)
        right.set_ylim(low - 0.05 * (high - low), top)
    styles = {"gsa_t2r": ("tab:blue", "-"), "gla_t2r": ("tab:orange", "-"),
              "retnet_t2r": ("tab:green", "-"), "gsa_scratch": ("tab:blue", "--")}
    for name, (color, style) in styles.items():
        if name in runs:
            pts = runs[name]["curve"]
            label = runs[name]["label"]
            if top is not None and pts and pts[0]["step"] == 0 and pts[0]["val_ppl"] > top:
                label += f" (starts at {pts[0]['val_ppl']:.1f})"
            if top is not None and runs[name]["final_val_ppl"] > top:
                label += f" (ends at {runs[name]['final_val_ppl']:.2f}, above the axis)"
            right.plot([p["tokens"] / scale for p in pts], [p["val_ppl"] for p in pts],
                       color=color, linestyle=style, marker=".", label=label)
    if "transformer" in runs:
        right.axhline(runs["transformer"]["final_val_ppl"], color="k", linestyle=":",
                      label="Transformer++ (end of pretraining)")
    right.set(xlabel=f"finetuning tokens ({unit})", ylabel="validation perplexity (per byte)",
              title="after conversion (same tokens for every run)")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(f"T2R in miniature ({record['tag']})")
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        record = harness.read_report(args.tag, "t2r_small", args.out_dir, "--plot-only")
        record["notes"] = record.get("notes", []) + args.note
        common.write_and_print(args.tag, "t2r_small", record, markdown(record),
                               fig=plot(record), out_dir=args.out_dir)
        return 0
    with harness.work_dir(args.work_dir, "gsa_t2r_") as work_dir:
        tag, record = train_runs(args, work_dir)
    common.write_and_print(tag, "t2r_small", record, markdown(record), fig=plot(record),
                           out_dir=args.out_dir)
    return 0


def train_runs(args, work_dir: pathlib.Path) -> tuple[str, dict]:
    """Pretraining, the conversions and the scratch run, the report rewritten after each:
    (tag, record)."""
    import jax
    from gsa_jax import convert
    from gsa_jax.models import count_params
    from gsa_jax.train import train

    tag = args.tag or jax.default_backend()
    size = args.size
    pre_model = base_model(args)
    tokens_per_step = size["batch_size"] * size["seq_len"]
    record: dict[str, Any] = {"tag": tag, "size": size, "impl": args.impl, "dtype": args.dtype,
                              "seed": args.seed, "tokens_per_step": tokens_per_step,
                              "model": pre_model.to_dict(), "runs": {},
                              "notes": list(args.note)}
    print(f"T2R in miniature: pretrain {size['pretrain_steps']} steps, then 4 runs of "
          f"{size['finetune_steps']} steps ({tokens_per_step:,} tokens/step), work dir "
          f"{work_dir}", flush=True)
    start = time.perf_counter()
    for i, (name, (label, mixer, init)) in enumerate(RUNS.items()):
        t0 = time.perf_counter()
        init_from = None
        if name == "transformer":
            model = pre_model
        elif init == "t2r":
            model, init_from = convert_pretrained(args, mixer, work_dir / "transformer",
                                                  work_dir)
        else:
            model = convert.target_config(pre_model, mixer, **TARGET_OVERRIDES[mixer])
        config = run_config(args, name, model, work_dir)
        print(f"[{i + 1}/{len(RUNS)}] {label}: {config.steps} steps, lr "
              f"{config.optim.lr:g}" + (f", from {init_from}" if init_from else ""),
              flush=True)
        out = train(config, quiet=args.no_progress,
                    init_from=None if init_from is None else str(init_from))
        run = {"label": label, "mixer": mixer, "init": init, "steps": config.steps,
               "lr": config.optim.lr, "params": count_params(model),
               "curve": curve(work_dir / name, tokens_per_step),
               "final_val_loss": out["val_loss"], "final_val_ppl": out["val_ppl"],
               "last_train_loss": out.get("loss", math.nan),
               "time_s": round(time.perf_counter() - t0, 1)}
        record["runs"][name] = run
        record["val_tokens"] = out["val_tokens"]
        print(f"[{i + 1}/{len(RUNS)}] {name}: val ppl {run['final_val_ppl']:.3f} in "
              f"{run['time_s']:.0f} s (total {time.perf_counter() - start:.0f} s)",
              flush=True)
        record.update(claim=claim(record["runs"]),
                      elapsed_s=round(time.perf_counter() - start, 1))
        common.write_results(tag, "t2r_small", record, markdown(record),
                             out_dir=args.out_dir)
    return tag, record


if __name__ == "__main__":
    sys.exit(main())

"""In-context recall on MQAR (the paper's recall figure): accuracy of 2-layer GSA, GLA, RetNet,
ABC and Transformer++ models against model width, one panel per sequence length.

Two setups. `--authors` runs the GSA authors' own recipe (4 blocks without MLP, T = 512, lr grid,
seeds, early stop; experiments/mqar_authors.py, results mqar_authors_<tag>). Without it, this
file's SECOND setup (described below, results mqar_<tag>): ours, a 2-layer variant with MLPs and
short convolutions trained on a packed mixture of lengths.

    python experiments/mqar.py --tag h100        # the real sweep, one GPU (see REAL below)
    python experiments/mqar.py --smoke --tag cpu  # tiny, a CPU check of the whole pipeline
    python experiments/mqar.py --authors --smoke --tag cpu   # the authors' setup, tiny

Task: Zoology's multi-query associative recall (`gsa_jax.data.mqar`): vocabulary 8192, power-law
query placement (α = 0.01), random filler tokens; tested on P = 64 key-value pairs at T = 256
and T = 512 (held-out sets, one per (T, P), other seeds). Training follows Zoology's recipe of a
MIXTURE of difficulties (--train-mix): easy tasks let a model find the recall mechanism before
the hard ones (Zoology: 100K sequences of (T, P) = (64, 4) and 20K each of (128, 8), (256, 16),
(256, 32), (256, 64)). Here the components and their shares of the training tokens are

    (64, 4) 25%, (128, 8) 10%, (256, 16) 15%, (256, 32) 15%, (256, 64) 15%, (512, 64) 20%

(Zoology's proportions, plus the T = 512 test task so that no model is tested beyond its
training length), packed into rows of 512 tokens: a row holds 512 / T sequences of one
component as separate segments (states reset and attention masked between them;
`gsa_jax.data.mqar.generate_packed`), and the rows of all components are shuffled together.
One training run per model and width serves every test length.

Models: `gsa_jax.models.CausalLM` with L = 2 blocks [mixer, SwiGLU MLP] at width D. Every mixer
gets a short causal convolution (depthwise, width 4, + SiLU) on q/k/v, as Zoology puts a short
convolution before every mixer, its attention baseline included (a Hybrid [BaseConv, MHA]): it
lets one layer bind a key to the value after it. The linear mixers have it as the layers'
use_short_conv (off with --no-short-conv); Transformer++ gets the same convolution through
the attention layer's use_short_conv (ModelConfig.attention_short_conv; off with
--no-attention-conv: the plain attention layer, which must first learn a previous-token head
and on CPU analogues stayed on the plateau where the conv version learned in a few hundred
steps.) The convolution kernels are drawn as PyTorch's Conv1d default, U(±1/sqrt(4)), which
Zoology's models keep (--conv-init torch; "model" keeps the project's normal(0.02), fla's init,
under which the mixers' q/k/v start ~50x smaller):

    gsa        GSA, 4 heads, 64 slots, swish features, τ = 8 (the paper's layer)
    gla        GLA, 4 heads, expand_k 0.5, τ = 16
    retnet     RetNet (multi-scale retention), 4 heads, expand_v 2
    abc        GSA with gate="none" (ABC: no forget gate)
    attention  Transformer++ (softmax attention with RoPE), 4 heads

Training: a compact jitted loop of our own (the project trainer packs LM text; MQAR needs the
loss on query positions only): cross-entropy over the positions whose label is not -100 (mean
over the queries of the batch), AdamW with warmup + cosine decay and clipping from
`gsa_jax.optim`, the same seed, initialisation and data order for every model. Learning rates:
a small grid (--lr), each model and width trained once per lr, and each test set reports the lr
with the best final accuracy (Zoology sweeps 1e-4..1e-2 and keeps the best per model and width;
the best lr differs by model: on CPU analogues GSA needed ~1e-2 while plain attention failed
there). The lr is an input of the compiled program, so the grid costs training time, not
compiles. `--eval-every` steps run as one jitted `lax.scan` followed by the held-out accuracy on
every test set (argmax at query positions == value, over all queries), so there is one compile
per model and width and no Python in the inner loop; worker threads initialise and compile the
next runs (--compile-ahead) while one trains.

Results: experiments/results/mqar_<tag>.json (config with the training mixture, one row per
(model, width, T) with the best lr's accuracy curve and every lr's results under "by_lr") and
.md (table per T, and whether GSA beats GLA and RetNet at equal width, the paper's claim), .png
(accuracy vs width per model, one panel per T). Rewritten after every run, so a sweep cut short
keeps what it finished; `--merge` adds runs to an existing tag (to split the sweep over several
commands: `--widths 64 128`, then `--widths 256 512 --merge`).

Budget (real size, REAL below): 5 models x 4 widths = 20 runs of 6000 steps x 64 rows x 512
tokens at lr 3e-3 (384K training rows, each seen once: 197M tokens). On one H100 a run trained in
40-260 s (D = 64 .. 512, 3-4 runs sharing the GPU), plus ~45 s of init + compile that overlaps
the previous run's training: about 40 minutes for the sweep alone, so split it over commands of
under 10 minutes with --models/--widths and --merge. Why 6000 steps: at 1500 (two lrs, 3e-3 and
1e-2) GSA, GLA and RetNet had not yet left the initial loss plateau (ln of the value-vocabulary
size) at any width (results/mqar_h100short.md); 3e-3 was the better lr for all three. Zoology
trains longer still, with an lr sweep; read the accuracies as those of a fixed budget.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common, harness  # noqa: E402
from experiments.mqar_report import LABELS, MODELS, markdown, plot, verdict  # noqa: E402
# The data, the models and their training (mqar_train.py); make_runner, model_config and
# torch_conv_init also as mqar.<name>, which the tests use.
from experiments.mqar_train import (  # noqa: E402,F401
    data_shapes, fit, make_data, make_runner, model_config, prepare, task, torch_conv_init,
    train_row_len)


# The real sweep (results/mqar_h100.md): ~40 minutes of training on one H100.
REAL = dict(vocab_size=8192, seq_lens=[256, 512], kv_pairs=[64],
            train_mix=["64:4:0.25", "128:8:0.1", "256:16:0.15", "256:32:0.15", "256:64:0.15",
                       "512:64:0.2"],
            widths=[64, 128, 256, 512], steps=6000, batch_size=64, test_examples=1024,
            eval_every=1000, lr=[3e-3], warmup_frac=0.05, attention_conv=True,
            conv_init="torch", dtype="bfloat16")
# A CPU check of the pipeline (about 20 s on 2 cores: one compile per run dominates): every
# model at one width, trained on a two-task mixture and tested on the longer task.
SMOKE = dict(vocab_size=64, seq_lens=[32], kv_pairs=[4], train_mix=["16:2", "32:4"],
             widths=[16], steps=16, batch_size=8, test_examples=32, eval_every=8, lr=[3e-3],
             warmup_frac=0.1, attention_conv=True, conv_init="torch", dtype="float32")


# ------------------------------------------------------------------ arguments
def parse_mix(specs) -> list[tuple[int, int, float]]:
    """["T:P[:share]", ...] -> [(T, P, share)] (share default 1; shares are of training rows,
    i.e. of tokens, and are normalised over the components)."""
    out = []
    for spec in specs:
        parts = str(spec).split(":")
        try:
            if len(parts) not in (2, 3):
                raise ValueError
            T, P = int(parts[0]), int(parts[1])
            share = float(parts[2]) if len(parts) == 3 else 1.0
        except ValueError:
            raise ValueError(f"--train-mix: {spec!r} is not T:P or T:P:share") from None
        if T < 1 or P < 1 or not share > 0 or not math.isfinite(share):
            raise ValueError(f"--train-mix: {spec!r} needs T, P >= 1 and a positive share")
        out.append((T, P, share))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    sizes = "; ".join(f"{k}={v}" for k, v in REAL.items())
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"Real-size defaults: {sizes}. --smoke defaults: " +
                                "; ".join(f"{k}={v}" for k, v in SMOKE.items()) + ".")
    p.add_argument("--tag", default=None, help="results file suffix (default: the backend)")
    p.add_argument("--smoke", action="store_true", help="CPU-sized run (see below)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--widths", type=int, nargs="+", help="model widths D")
    p.add_argument("--seq-lens", type=int, nargs="+",
                   help="sequence lengths T of the held-out test sets")
    p.add_argument("--kv-pairs", type=int, nargs="+",
                   help="P of each test set (one value: the same for all)")
    p.add_argument("--train-mix", nargs="+", metavar="T:P[:SHARE]",
                   help="the training mixture: (T, P) components and their shares of the "
                        "training rows (tokens), packed into rows as long as the longest "
                        "component (default: Zoology's curriculum plus the test tasks, see REAL)")
    p.add_argument("--vocab-size", type=int, help="V (Zoology's is 8192)")
    p.add_argument("--power-a", type=float, default=0.01, help="query placement power law α")
    p.add_argument("--no-random-non-queries", action="store_true",
                   help="filler tokens 0 instead of random tokens")
    p.add_argument("--steps", type=int, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, help="training rows per step (and test batch)")
    p.add_argument("--train-examples", type=int,
                   help="training rows (default steps x batch: every row seen once; fewer are "
                        "cycled through in epochs)")
    p.add_argument("--test-examples", type=int, help="held-out sequences per test set")
    p.add_argument("--eval-every", type=int,
                   help="steps per jitted chunk; held-out accuracy after each")
    p.add_argument("--lr", type=float, nargs="+",
                   help="peak learning rate, or a grid of them: each model and width trains "
                        "once per lr from the same initialisation and data (one compile: the lr "
                        "is an input of the compiled program), and each test set reports the "
                        "lr with the best final accuracy, as Zoology's sweeps do")
    p.add_argument("--warmup-frac", type=float, help="warmup share of the steps")
    p.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="the cosine decay ends at lr x this")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="compute dtype (parameters stay float32)")
    p.add_argument("--impl", default="auto", help="form of the linear-attention ops")
    p.add_argument("--no-short-conv", action="store_true",
                   help="no short convolution on q/k/v of the linear mixers (Zoology puts one "
                        "before every mixer; ours is the layers' use_short_conv)")
    p.add_argument("--attention-conv", action=argparse.BooleanOptionalAction, default=None,
                   help="the same short convolution on q/k/v of Transformer++'s attention (as "
                        "Zoology's attention baseline, conv + MHA); --no-attention-conv: the "
                        "project's plain attention layer")
    p.add_argument("--conv-init", choices=["model", "torch"],
                   help="initialisation of the short convolutions' kernels: 'model' keeps the "
                        "model's (normal, std 0.02, as fla's _init_weights), 'torch' redraws "
                        "them from PyTorch's Conv1d default U(±1/sqrt(width)), which Zoology's "
                        "models keep")
    p.add_argument("--seed", type=int, default=0, help="data and initialisation seed")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of the existing results of this tag that this run does "
                        "not redo (the task and training settings must match)")
    p.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    p.add_argument("--compile-cache", default=None,
                   help="directory for jax's persistent compilation cache (re-runs skip "
                        "compiling)")
    p.add_argument("--compile-ahead", type=int, default=None,
                   help="runs prepared (initialised and compiled) in background threads while "
                        "one trains (default: min(4, CPU cores / 2))")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = p.parse_args(argv)
    sizes = SMOKE if args.smoke else REAL
    for key, value in sizes.items():  # the size's defaults where not given
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if len(args.kv_pairs) not in (1, len(args.seq_lens)):
        p.error(f"--kv-pairs takes one value or one per sequence length ({len(args.seq_lens)})")
    if len(args.kv_pairs) == 1:
        args.kv_pairs = args.kv_pairs * len(args.seq_lens)
    if len(set(args.seq_lens)) != len(args.seq_lens):
        p.error("--seq-lens must be distinct")
    try:
        args.train_mix = parse_mix(args.train_mix)
        for T, P in [(T, P) for T, P, _ in args.train_mix] + list(zip(args.seq_lens,
                                                                      args.kv_pairs)):
            task(args, T, P)   # a valid MQAR task (raises ValueError otherwise)
    except ValueError as err:
        p.error(str(err))
    if args.compile_ahead is None:
        args.compile_ahead = max(1, min(4, (os.cpu_count() or 2) // 2))
    if args.compile_ahead < 0:
        p.error("--compile-ahead must be >= 0")
    for name in ("steps", "batch_size", "test_examples", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if any(not lr > 0 for lr in args.lr):
        p.error("--lr must be positive")
    if not 0 <= args.warmup_frac <= 1 or not 0 <= args.min_lr_ratio <= 1:
        p.error("--warmup-frac and --min-lr-ratio must be in [0, 1]")
    if args.steps % args.eval_every:
        p.error(f"--steps ({args.steps}) must be a multiple of --eval-every ({args.eval_every})")
    if args.train_examples is not None and args.train_examples < args.batch_size:
        p.error("--train-examples must be at least --batch-size")
    return args


def task_config(args) -> dict[str, Any]:
    """The settings that make runs comparable (checked by --merge)."""
    keys = ("vocab_size", "power_a", "steps", "batch_size", "train_examples", "test_examples",
            "eval_every", "lr", "warmup_frac", "min_lr_ratio", "weight_decay", "dtype", "impl",
            "seed", "no_short_conv", "attention_conv", "conv_init")
    out = {k: getattr(args, k) for k in keys}
    out["random_non_queries"] = not args.no_random_non_queries
    total = sum(w for _, _, w in args.train_mix)
    out["train_mix"] = [{"seq_len": T, "num_kv_pairs": P, "share": round(w / total, 6)}
                        for T, P, w in args.train_mix]
    out["train_row_len"] = train_row_len(args)
    return out


def load_previous(args, tag: str) -> dict:
    """The existing results of this tag (for --merge; empty without them); the settings must
    match."""
    old = harness.read_report(tag, "mqar", args.out_dir)
    if old is None:
        return {}
    diff = common.merge_mismatch(old["config"], task_config(args))
    if diff:
        path = common.results_paths(tag, "mqar", args.out_dir)["json"]
        raise ValueError(f"--merge: {path} was run with other settings (old, new): {diff}")
    return old


# ------------------------------------------------------------------ main
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--authors" in argv:   # the authors' setup has its own options (mqar_authors.py --help)
        from experiments import mqar_authors
        return mqar_authors.main([a for a in argv if a != "--authors"])
    args = parse_args(argv)
    common.enable_compilation_cache(args.compile_cache)
    import jax
    from tqdm.auto import tqdm

    tag = args.tag or jax.default_backend()
    previous = load_previous(args, tag) if args.merge else {}
    runs = [(D, m) for D in args.widths for m in args.models]
    redo = {(T, D, m) for T in args.seq_lens for D, m in runs}
    rows = [r for r in previous.get("rows", [])
            if (r["seq_len"], r["width"], r["model"]) not in redo]
    record = {"tag": tag, "config": task_config(args), "rows": rows,
              "commands": previous.get("commands", []) + [common.command_line(argv, __file__)]}
    tests = list(zip(args.seq_lens, args.kv_pairs))
    mix = ", ".join(f"{T}:{P}" for T, P, _ in args.train_mix)
    print(f"MQAR sweep: {len(runs)} runs ({', '.join(args.models)}; widths {args.widths}) "
          f"trained on the (T, P) mixture [{mix}] in rows of {train_row_len(args)}, tested on "
          f"{tests}, on {jax.device_count()} {jax.devices()[0].device_kind}", flush=True)
    shapes = data_shapes(args)
    bar = tqdm(total=len(runs) * len(args.lr) * args.steps, unit="step", dynamic_ncols=True,
               disable=args.no_progress)
    # Compiling is the larger part of a run at these sizes: `compile_ahead` worker threads
    # prepare (init + compile) the next runs while the current one trains.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.compile_ahead + 1)
    pending: dict[int, concurrent.futures.Future] = {}

    def submit(i: int) -> None:
        if i < len(runs) and i not in pending:
            D, m = runs[i]
            pending[i] = pool.submit(prepare, args, m, D, shapes)

    start = time.perf_counter()
    try:
        for j in range(args.compile_ahead + 1):   # the first compiles overlap the data
            submit(j)
        data = make_data(args)
        record["config"]["train_queries_per_row"] = round(data["train_queries_per_row"], 3)
        bar.write(f"data: {data['n_train']} training rows, {data['n_test']} test sequences per "
                  f"(T, P) ({time.perf_counter() - start:.1f} s)")
        for i, (D, m) in enumerate(runs):
            for j in range(i, i + args.compile_ahead + 1):
                submit(j)
            bar.set_description(f"{m} D={D}")

            def on_chunk(point, bar=bar):
                bar.update(args.eval_every)
                bar.set_postfix(loss=f"{point['loss']:.3f}",
                                acc="/".join(f"{a:.3f}" for a in point["accuracy"]))

            new_rows = fit(args, pending.pop(i).result(), data, on_chunk)
            for row in new_rows:
                bar.write(f"{LABELS[m]:>13} D={D:<4} T={row['seq_len']:<4} "
                          f"P={row['num_kv_pairs']:<3}: accuracy {100 * row['accuracy']:5.1f}% "
                          f"(lr {row['lr']:g}"
                          + "".join(f"; {r['lr']:g}: {100 * r['accuracy']:.1f}%"
                                    for r in row["by_lr"] if r["lr"] != row["lr"]) + ")  "
                          f"train loss {row['final_loss']:.3f}  ({row['params']:,} params; "
                          f"init + compile {row['compile_s']:.1f} s, train {row['train_s']:.1f} s)")
            rows.extend(new_rows)
            record["verdict"] = verdict(rows)
            record["elapsed_s"] = round(time.perf_counter() - start, 1)
            common.write_results(tag, "mqar", record, markdown(record), out_dir=args.out_dir,
                                 command=record["commands"][-1])
    finally:
        for future in pending.values():
            future.cancel()
        pool.shutdown(wait=True)
    bar.close()
    record["verdict"] = verdict(rows)
    fig = plot(record)
    common.write_and_print(tag, "mqar", record, markdown(record), fig=fig,
                           command=record["commands"][-1], out_dir=args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

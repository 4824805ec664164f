"""In-context recall on MQAR (the paper's recall figure): accuracy of 2-layer GSA, GLA, RetNet,
ABC and Transformer++ models against model width, one panel per sequence length.

    python experiments/mqar.py --tag h100        # the real sweep, one GPU (see REAL below)
    python experiments/mqar.py --smoke --tag cpu  # tiny, a CPU check of the whole pipeline

Task: Zoology's multi-query associative recall (`gsa_jax.data.mqar`): vocabulary 8192, P = 64
key-value pairs at T = 256 and 512, power-law query placement (α = 0.01), random filler tokens.
Each (T, P) has one training set and one held-out set (other seed), shared by every model and
width. Models: `gsa_jax.models.CausalLM` with L = 2 blocks [mixer, SwiGLU MLP] at width D; the
linear mixers get the layers' short causal convolution on q/k/v (Zoology puts a short
convolution before every mixer: it lets one layer bind a key to the value after it; off with
--no-short-conv):

    gsa        GSA, 4 heads, 64 slots, swish features, τ = 8 (the paper's layer)
    gla        GLA, 4 heads, expand_k 0.5, τ = 16
    retnet     RetNet (multi-scale retention), 4 heads, expand_v 2
    abc        GSA with gate="none" (ABC: no forget gate)
    attention  Transformer++ (softmax attention with RoPE), 4 heads

Training: a compact jitted loop of our own (the project trainer packs LM text; MQAR needs the
loss on query positions only): cross-entropy over the positions whose label is not -100, AdamW
with warmup + cosine decay and clipping from `gsa_jax.optim`, the same seed and data order for
every model. `--eval-every` steps run as one jitted `lax.scan` followed by the held-out accuracy
(argmax at query positions == value, over all queries), so there is one compile per run and no
Python in the inner loop; worker threads initialise and compile the next runs (--compile-ahead)
while one trains.

Results: experiments/results/mqar_<tag>.json (config, one row per (model, width, T) with the
accuracy curve) and .md (table per T, and whether GSA beats GLA and RetNet at equal width, the
paper's claim), .png (accuracy vs width per model, one panel per T). Rewritten after every run,
so a sweep cut short keeps what it finished; `--merge` adds runs to an existing tag (to split the
sweep over several commands: `--seq-lens 256`, then `--seq-lens 512 --merge`).

Budget (real size, REAL below): 5 models x 4 widths x 2 lengths = 40 runs of 1500 steps at
batch 64 (96k training sequences per T, each seen once; Zoology trains for far longer, so read
the accuracies as a fixed, small budget); about 8 minutes on one H100 by estimate, the time of
every run (init + compile, train) is printed and recorded.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402

MODELS = ("gsa", "gla", "retnet", "abc", "attention")
LABELS = {"gsa": "GSA", "gla": "GLA", "retnet": "RetNet", "abc": "ABC",
          "attention": "Transformer++"}

# The real sweep: ~8 minutes on one H100 (estimate; each run's time is recorded).
REAL = dict(vocab_size=8192, seq_lens=[256, 512], kv_pairs=[64], widths=[64, 128, 256, 512],
            steps=1500, batch_size=64, test_examples=1024, eval_every=250, lr=2e-3,
            dtype="bfloat16")
# A CPU check of the pipeline (about 20 s on 2 cores: one compile per run dominates): every
# model at one width and one short length.
SMOKE = dict(vocab_size=64, seq_lens=[32], kv_pairs=[4], widths=[16], steps=16,
             batch_size=8, test_examples=32, eval_every=8, lr=3e-3, dtype="float32")


# ------------------------------------------------------------------ arguments
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
    p.add_argument("--seq-lens", type=int, nargs="+", help="sequence lengths T")
    p.add_argument("--kv-pairs", type=int, nargs="+",
                   help="P per sequence length (one value: the same for all)")
    p.add_argument("--vocab-size", type=int, help="V (Zoology's is 8192)")
    p.add_argument("--power-a", type=float, default=0.01, help="query placement power law α")
    p.add_argument("--no-random-non-queries", action="store_true",
                   help="filler tokens 0 instead of random tokens")
    p.add_argument("--steps", type=int, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, help="sequences per step")
    p.add_argument("--train-examples", type=int, default=None,
                   help="size of the training set (default steps x batch: every sequence "
                        "seen once; fewer are cycled through in epochs)")
    p.add_argument("--test-examples", type=int, help="held-out sequences per T")
    p.add_argument("--eval-every", type=int,
                   help="steps per jitted chunk; held-out accuracy after each")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--warmup-frac", type=float, default=0.1, help="warmup share of the steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="compute dtype (parameters stay float32)")
    p.add_argument("--impl", default="auto", help="form of the linear-attention ops")
    p.add_argument("--no-short-conv", action="store_true",
                   help="no short convolution on q/k/v of the linear mixers (Zoology puts one "
                        "before every mixer; ours is the layers' use_short_conv)")
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
    if args.compile_ahead is None:
        args.compile_ahead = max(1, min(4, (os.cpu_count() or 2) // 2))
    if args.compile_ahead < 0:
        p.error("--compile-ahead must be >= 0")
    for name in ("steps", "batch_size", "test_examples", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.steps % args.eval_every:
        p.error(f"--steps ({args.steps}) must be a multiple of --eval-every ({args.eval_every})")
    if args.train_examples is not None and args.train_examples < args.batch_size:
        p.error("--train-examples must be at least --batch-size")
    return args


def task_config(args) -> dict[str, Any]:
    """The settings that make runs comparable (checked by --merge)."""
    keys = ("vocab_size", "power_a", "steps", "batch_size", "train_examples", "test_examples",
            "eval_every", "lr", "warmup_frac", "weight_decay", "dtype", "impl", "seed",
            "no_short_conv")
    out = {k: getattr(args, k) for k in keys}
    out["random_non_queries"] = not args.no_random_non_queries
    return out


# ------------------------------------------------------------------ models
def model_config(name: str, width: int, vocab_size: int, dtype: str, impl: str,
                 short_conv: bool = True):
    """The ModelConfig of model `name` at width D (2 blocks, untied head). short_conv: the
    causal depthwise convolution (width 4) on q/k/v of the gsa/gla/retnet/abc mixers."""
    from gsa_jax.models import ModelConfig, get_preset
    base = {"gsa": "gsa-tiny", "abc": "gsa-tiny", "gla": "gla-tiny", "retnet": "retnet-tiny",
            "attention": "transformer-tiny"}[name]
    over: dict[str, Any] = dict(vocab_size=vocab_size, hidden_size=width, num_layers=2,
                                num_heads=4, attn_num_heads=4, dtype=dtype, impl=impl,
                                tie_word_embeddings=False, use_short_conv=short_conv)
    if name in ("gsa", "abc"):
        over["num_slots"] = 64            # the paper's M (gsa-tiny has 8)
    if name == "abc":
        over["gate"] = "none"
    config: ModelConfig = get_preset(base, **over)
    return config


# ------------------------------------------------------------------ training
def make_runner(model, tx, eval_every: int, batch_size: int):
    """run(params, opt_state, step0, train_x, train_y, test_x, test_y) ->
    (params, opt_state, mean train loss of the chunk, held-out accuracy), jitted.

    train_x/y: [N, T] int32 on the device, batch b = rows [b·B, (b+1)·B) mod N (N a multiple of
    B); test_x/y: [n_test_batches, B, T]. Labels are -100 off the query positions.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from gsa_jax.data.mqar import IGNORE
    from gsa_jax.optim import loss_sums

    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)                       # [B, T, V] f32
        mask = y != IGNORE
        sums = loss_sums(logits, jnp.where(mask, y, 0), mask)
        return sums.ce / jnp.maximum(sums.count, 1.0)

    grad_fn = jax.value_and_grad(loss_fn)

    def run(params, opt_state, step0, train_x, train_y, test_x, test_y):
        num_batches = train_x.shape[0] // batch_size

        def train_step(carry, i):
            params, opt_state = carry
            start = ((step0 + i) % num_batches) * batch_size
            x = jax.lax.dynamic_slice_in_dim(train_x, start, batch_size)
            y = jax.lax.dynamic_slice_in_dim(train_y, start, batch_size)
            loss, grads = grad_fn(params, x, y)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(train_step, (params, opt_state),
                                                   jnp.arange(eval_every))

        def correct(xy):
            x, y = xy
            pred = jnp.argmax(model.apply({"params": params}, x), axis=-1)
            mask = y != IGNORE
            return jnp.sum((pred == y) & mask), jnp.sum(mask)

        hits, count = jax.lax.map(correct, (test_x, test_y))
        accuracy = jnp.sum(hits) / jnp.maximum(jnp.sum(count), 1)
        return params, opt_state, jnp.mean(losses), accuracy

    return jax.jit(run, donate_argnums=(0, 1))


@dataclasses.dataclass
class Prepared:
    """A model ready to train: initial parameters, optimizer state and the compiled runner."""
    name: str
    width: int
    config: Any
    params: Any
    opt_state: Any
    compiled: Any
    num_params: int
    compile_s: float


def data_shapes(args, seq_len: int) -> tuple:
    """Shapes of make_data's arrays (train_x, train_y, test_x, test_y), for compiling ahead."""
    import jax
    import jax.numpy as jnp
    n_train, n_test = set_sizes(args)
    B = args.batch_size
    train = jax.ShapeDtypeStruct((n_train, seq_len), jnp.int32)
    test = jax.ShapeDtypeStruct((n_test // B, B, seq_len), jnp.int32)
    return train, train, test, test


def prepare(args, name: str, width: int, shapes: tuple) -> Prepared:
    """Builds model `name` at `width`, initialises it (seed args.seed) and compiles its runner
    for data of `shapes`. Thread-safe (flax's and jax's tracing state is per thread), so the
    sweep compiles the next runs while one trains."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from gsa_jax.models import CausalLM
    from gsa_jax.optim import OptimConfig, make_optimizer

    start = time.perf_counter()
    config = model_config(name, width, args.vocab_size, args.dtype, args.impl,
                          not args.no_short_conv)
    model = CausalLM(config)
    params = nn.meta.unbox(model.init(jax.random.key(args.seed),
                                      jnp.zeros((1, 1), jnp.int32))["params"])
    optim = OptimConfig(lr=args.lr, warmup_steps=int(args.warmup_frac * args.steps),
                        min_lr_ratio=0.1, weight_decay=args.weight_decay, grad_clip=1.0)
    tx, _ = make_optimizer(optim, args.steps)
    opt_state = tx.init(params)
    runner = make_runner(model, tx, args.eval_every, args.batch_size)
    compiled = runner.lower(params, opt_state, jnp.int32(0), *shapes).compile()
    return Prepared(name, width, config, params, opt_state, compiled,
                    int(sum(x.size for x in jax.tree.leaves(params))),
                    time.perf_counter() - start)


def fit(args, prep: Prepared, data: dict, on_chunk=None) -> dict[str, Any]:
    """Trains a prepared model on data["train_*"], measuring held-out accuracy every
    args.eval_every steps. Returns the run's row."""
    import jax.numpy as jnp

    operands = (data["train_x"], data["train_y"], data["test_x"], data["test_y"])
    params, opt_state = prep.params, prep.opt_state
    prep.params = prep.opt_state = None   # donated to the runner below
    curve, step = [], 0
    start = time.perf_counter()
    while step < args.steps:   # steps is a multiple of eval_every (checked)
        params, opt_state, loss, acc = prep.compiled(params, opt_state, jnp.int32(step),
                                                     *operands)
        step += args.eval_every
        point = {"step": step, "loss": float(loss), "accuracy": float(acc)}
        curve.append(point)
        if on_chunk is not None:
            on_chunk(point)
    train_s = time.perf_counter() - start
    final = curve[-1]
    return {"model": prep.name, "width": prep.width, "params": prep.num_params,
            "accuracy": final["accuracy"], "best_accuracy": max(p["accuracy"] for p in curve),
            "final_loss": final["loss"], "steps": step, "compile_s": round(prep.compile_s, 2),
            "train_s": round(train_s, 2), "curve": curve, "model_config": prep.config.to_dict()}


def set_sizes(args) -> tuple[int, int]:
    """(training, held-out) set sizes, rounded up to whole batches."""
    B = args.batch_size
    n_train = args.train_examples or args.steps * B
    return B * math.ceil(n_train / B), B * math.ceil(args.test_examples / B)


def make_data(args, seq_len: int, kv_pairs: int) -> dict:
    """Training and held-out sets of one (T, P) on the device (shared by every run)."""
    import jax.numpy as jnp
    from gsa_jax.data.mqar import MQARConfig, generate

    task = MQARConfig(vocab_size=args.vocab_size, seq_len=seq_len, num_kv_pairs=kv_pairs,
                      power_a=args.power_a, random_non_queries=not args.no_random_non_queries)
    B = args.batch_size
    n_train, n_test = set_sizes(args)
    # Independent draws for the two sets (and per T). Zoology warns of train/test overlap: at
    # V = 8192 a repeated sequence is astronomically unlikely (not so at smoke sizes).
    train = generate(task, n_train, seed=args.seed * 1_000_003 + 2 * seq_len + 0)
    test = generate(task, n_test, seed=args.seed * 1_000_003 + 2 * seq_len + 1)
    return {"train_x": jnp.asarray(train.inputs), "train_y": jnp.asarray(train.labels),
            "test_x": jnp.asarray(test.inputs.reshape(-1, B, seq_len)),
            "test_y": jnp.asarray(test.labels.reshape(-1, B, seq_len)),
            "n_train": n_train, "n_test": n_test, "task": dataclasses.asdict(task)}


# ------------------------------------------------------------------ reporting
def verdict(rows: list[dict]) -> dict[str, Any]:
    """Per (T, width) with GSA, GLA and RetNet: does GSA's accuracy exceed both?

    margin = acc(GSA) − max(acc(GLA), acc(RetNet)). A margin within the noise of the held-out
    set is a tie: |margin| ≤ max(0.5 points, 2 standard errors of the difference of two
    accuracies measured on n queries, sqrt(a(1−a)/n + b(1−b)/n)). Holds: no loss and at least
    one win; inconclusive: only ties."""
    cells = []
    by_key = {(r["seq_len"], r["width"], r["model"]): r for r in rows}
    for seq_len, width in sorted({(r["seq_len"], r["width"]) for r in rows}):
        got = {m: by_key.get((seq_len, width, m)) for m in ("gsa", "gla", "retnet")}
        if any(r is None for r in got.values()):
            continue
        a = got["gsa"]["accuracy"]
        b = max(got["gla"]["accuracy"], got["retnet"]["accuracy"])
        n = got["gsa"]["test_queries"]
        tie = max(0.005, 2 * math.sqrt((a * (1 - a) + b * (1 - b)) / n))
        margin = a - b
        outcome = "win" if margin > tie else ("tie" if margin >= -tie else "loss")
        cells.append({"seq_len": seq_len, "width": width, "margin": margin, "tie_within": tie,
                      "outcome": outcome})
    wins = sum(c["outcome"] == "win" for c in cells)
    losses = sum(c["outcome"] == "loss" for c in cells)
    ties = len(cells) - wins - losses
    summary = (None if not cells else "does not hold" if losses else
               "holds" if wins else "inconclusive")
    return {"cells": cells, "wins": wins, "ties": ties, "losses": losses,
            "holds": (losses == 0 and wins > 0) if cells else None, "summary": summary}


def markdown(record: dict) -> str:
    rows, cfg = record["rows"], record["config"]
    lines = [f"# MQAR: accuracy vs model width ({record['tag']})", "",
             f"Zoology's multi-query associative recall, V = {cfg['vocab_size']}, power law "
             f"α = {cfg['power_a']}, random filler = {cfg['random_non_queries']}; 2-layer "
             f"models (short convolution in the linear mixers: {not cfg['no_short_conv']}); "
             f"{cfg['steps']} steps x {cfg['batch_size']} sequences, lr {cfg['lr']} "
             f"(warmup {cfg['warmup_frac']:.0%}, cosine), weight decay {cfg['weight_decay']}, "
             f"{cfg['dtype']} compute; accuracy = share of held-out queries "
             f"({cfg['test_examples']} sequences per T) whose argmax is the bound value, after "
             f"the last step (best over evaluations in the JSON).", ""]
    v = record["verdict"]
    if v["holds"] is None:
        lines.append("**Claim (GSA beats GLA and RetNet at equal width):** not testable here "
                     "(needs gsa, gla and retnet at the same widths).")
    else:
        cells = ", ".join(f"T={c['seq_len']} D={c['width']}: {c['outcome']} "
                          f"({100 * c['margin']:+.1f} pts)" for c in v["cells"])
        word = v["summary"].upper()
        lines.append(f"**Claim (GSA beats GLA and RetNet at equal width): {word}** in this run: "
                     f"GSA wins {v['wins']}, ties {v['ties']} (within the held-out noise: "
                     f"max(0.5 points, 2 standard errors)), loses {v['losses']} of "
                     f"{len(v['cells'])} (T, width) cells. {cells}.")
    for seq_len in sorted({r["seq_len"] for r in rows}):
        sub = [r for r in rows if r["seq_len"] == seq_len]
        widths = sorted({r["width"] for r in sub})
        kv = sub[0]["num_kv_pairs"]
        lines += ["", f"## T = {seq_len}, {kv} key-value pairs", ""]
        table = []
        for m in [m for m in MODELS if any(r["model"] == m for r in sub)]:
            acc = {r["width"]: r["accuracy"] for r in sub if r["model"] == m}
            table.append([LABELS[m]] + [common.fmt(100 * acc[w], 1) if w in acc else "-"
                                        for w in widths])
        lines.append(common.markdown_table(["model"] + [f"D={w}" for w in widths], table))
    compile_s = sum(r["compile_s"] for r in rows)
    train_s = sum(r["train_s"] for r in rows)
    lines += ["", f"Accuracy in %. {len(rows)} runs: {train_s:.0f} s of training and "
                  f"{compile_s:.0f} s of init + compile (in worker threads, overlapping the "
                  f"training) summed over runs; per run in the JSON. Wall time of the last "
                  f"command: {record.get('elapsed_s', 0):.0f} s."]
    return "\n".join(lines)


def plot(record: dict):
    plt = common.pyplot()
    rows = record["rows"]
    if plt is None or not rows:
        return None
    seq_lens = sorted({r["seq_len"] for r in rows})
    fig, axes = plt.subplots(1, len(seq_lens), figsize=(4.2 * len(seq_lens), 3.6),
                             squeeze=False, sharey=True)
    for ax, seq_len in zip(axes[0], seq_lens):
        sub = [r for r in rows if r["seq_len"] == seq_len]
        for m in MODELS:
            pts = sorted((r["width"], 100 * r["accuracy"]) for r in sub if r["model"] == m)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=LABELS[m])
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["width"] for r in sub}),
                      [str(w) for w in sorted({r["width"] for r in sub})])
        ax.set_title(f"T = {seq_len}, {sub[0]['num_kv_pairs']} KV pairs")
        ax.set_xlabel("model width")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MQAR accuracy (%)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def load_previous(args, paths) -> dict:
    """The existing results of this tag (for --merge; empty without them); the settings must
    match."""
    if not paths["json"].exists():
        return {}
    old = json.loads(paths["json"].read_text())
    diff = common.merge_mismatch(old["config"], task_config(args))
    if diff:
        raise ValueError(f"--merge: {paths['json']} was run with other settings (old, new): "
                         f"{diff}")
    return old


# ------------------------------------------------------------------ main
def main(argv=None) -> int:
    args = parse_args(argv)
    common.enable_compilation_cache(args.compile_cache)
    import jax
    from tqdm.auto import tqdm

    tag = args.tag or jax.default_backend()
    paths = common.results_paths(tag, "mqar", args.out_dir)
    previous = load_previous(args, paths) if args.merge else {}
    runs = [(T, P, D, m) for T, P in zip(args.seq_lens, args.kv_pairs)
            for D in args.widths for m in args.models]
    redo = {(T, D, m) for T, _, D, m in runs}
    rows = [r for r in previous.get("rows", [])
            if (r["seq_len"], r["width"], r["model"]) not in redo]
    record = {"tag": tag, "config": task_config(args), "rows": rows,
              "commands": previous.get("commands", []) + [common.command_line(argv, __file__)]}
    print(f"MQAR sweep: {len(runs)} runs ({', '.join(args.models)}; widths {args.widths}; "
          f"(T, P) {list(zip(args.seq_lens, args.kv_pairs))}) on {jax.device_count()} "
          f"{jax.devices()[0].device_kind}", flush=True)
    bar = tqdm(total=len(runs) * args.steps, unit="step", dynamic_ncols=True,
               disable=args.no_progress)
    # Compiling is the larger part of a run at these sizes: `compile_ahead` worker threads
    # prepare (init + compile) the next runs while the current one trains.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.compile_ahead + 1)
    pending: dict[int, concurrent.futures.Future] = {}

    def submit(i: int) -> None:
        if i < len(runs) and i not in pending:
            T, _, D, m = runs[i]
            pending[i] = pool.submit(prepare, args, m, D, data_shapes(args, T))

    data, start = None, time.perf_counter()
    try:
        for i, (T, P, D, m) in enumerate(runs):
            for j in range(i, i + args.compile_ahead + 1):
                submit(j)
            if data is None or data["task"]["seq_len"] != T:
                data = None  # free the previous length's arrays first
                data = make_data(args, T, P)
            bar.set_description(f"{m} D={D} T={T}")

            def on_chunk(point, bar=bar):
                bar.update(args.eval_every)
                bar.set_postfix(loss=f"{point['loss']:.3f}", acc=f"{point['accuracy']:.3f}")

            row = fit(args, pending.pop(i).result(), data, on_chunk)
            row.update(seq_len=T, num_kv_pairs=P, test_queries=data["n_test"] * P)
            bar.write(f"{LABELS[m]:>13} D={D:<4} T={T:<4} P={P:<3}: accuracy "
                      f"{100 * row['accuracy']:5.1f}%  loss {row['final_loss']:.3f}  "
                      f"({row['params']:,} params; init + compile {row['compile_s']:.1f} s, "
                      f"train {row['train_s']:.1f} s)")
            rows.append(row)
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

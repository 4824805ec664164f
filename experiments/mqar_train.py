"""MQAR's second setup (experiments/mqar.py): the data (a packed training mixture and one
held-out set per (T, P)), the 2-layer models, and the training: a jitted runner of
--eval-every steps with the lr as an input, prepared (initialised and compiled) in worker threads
while another run trains, and fit, which trains one model per lr and keeps the best per test set.
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from typing import Any


def train_row_len(args) -> int:
    """L: the length of a training row (the longest component of the mixture)."""
    return max(T for T, _, _ in args.train_mix)


# ------------------------------------------------------------------ models
def model_config(name: str, width: int, vocab_size: int, dtype: str, impl: str,
                 short_conv: bool = True, attention_conv: bool = False):
    """The ModelConfig of model `name` at width D (2 blocks, untied head). short_conv: the
    causal depthwise convolution (width 4) on q/k/v of the gsa/gla/retnet/abc mixers;
    attention_conv: the same convolution on q/k/v of the attention mixer (ModelConfig's
    attention_short_conv; also recorded as the attention config's use_short_conv)."""
    from gsa_jax.models import ModelConfig, get_preset
    base = {"gsa": "gsa-tiny", "abc": "gsa-tiny", "gla": "gla-tiny", "retnet": "retnet-tiny",
            "attention": "transformer-tiny"}[name]
    conv = attention_conv if name == "attention" else short_conv
    over: dict[str, Any] = dict(vocab_size=vocab_size, hidden_size=width, num_layers=2,
                                num_heads=4, attn_num_heads=4, dtype=dtype, impl=impl,
                                tie_word_embeddings=False, use_short_conv=conv,
                                # unscanned as in the recorded runs (mqar_h100): the layers'
                                # initial draws and torch_conv_init's [W, C] kernels
                                scan_layers=False)
    if name == "attention":
        over["attention_short_conv"] = conv
    if name in ("gsa", "abc"):
        over["num_slots"] = 64            # the paper's M (gsa-tiny has 8)
    if name == "abc":
        over["gate"] = "none"
    config: ModelConfig = get_preset(base, **over)
    return config


def build_model(config):
    """CausalLM(config) (an attention model with attention_short_conv has the convolution on
    q/k/v through the library's Attention(use_short_conv=True))."""
    from gsa_jax.models import CausalLM
    return CausalLM(config)


# ------------------------------------------------------------------ training
def make_runner(model, tx, eval_every: int, batch_size: int):
    """run(params, opt_state, step0, lr, train, tests) -> (params, opt_state, mean train loss of
    the chunk, held-out accuracy per test set [n_tests]), jitted.

    tx: the optimizer at peak lr 1 (its updates are linear in the lr: AdamW's step and decoupled
    weight decay are both multiplied by it), scaled here by the traced `lr`, so one compiled
    program serves a whole lr grid.
    train: (x, y, segment_ids or None), each [N, L] int32 on the device; batch b = rows
    [b·B, (b+1)·B) mod N (N a multiple of B); segment_ids separate the sequences packed in a
    row (None: one sequence per row). tests: ((x, y), ...) with x, y [n_batches, B, T] (one
    sequence per row). Labels are -100 off the query positions; the loss is the mean over the
    query positions of the batch.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from gsa_jax.data.mqar import IGNORE
    from gsa_jax.optim import loss_sums

    def loss_fn(params, x, y, seg):
        logits = model.apply({"params": params}, x, segment_ids=seg)      # [B, L, V] f32
        mask = y != IGNORE
        sums = loss_sums(logits, jnp.where(mask, y, 0), mask)
        return sums.ce / jnp.maximum(sums.count, 1.0)

    grad_fn = jax.value_and_grad(loss_fn)

    def run(params, opt_state, step0, lr, train, tests):
        train_x, train_y, train_seg = train
        num_batches = train_x.shape[0] // batch_size

        def train_step(carry, i):
            params, opt_state = carry
            start = ((step0 + i) % num_batches) * batch_size
            x, y = (jax.lax.dynamic_slice_in_dim(a, start, batch_size) for a in (train_x, train_y))
            seg = (None if train_seg is None else
                   jax.lax.dynamic_slice_in_dim(train_seg, start, batch_size))
            loss, grads = grad_fn(params, x, y, seg)
            updates, opt_state = tx.update(grads, opt_state, params)
            updates = jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(train_step, (params, opt_state),
                                                   jnp.arange(eval_every))

        def correct(xy):
            x, y = xy
            pred = jnp.argmax(model.apply({"params": params}, x), axis=-1)
            mask = y != IGNORE
            return jnp.sum((pred == y) & mask), jnp.sum(mask)

        accuracies = []
        for test in tests:
            hits, count = jax.lax.map(correct, test)
            accuracies.append(jnp.sum(hits) / jnp.maximum(jnp.sum(count), 1))
        return params, opt_state, jnp.mean(losses), jnp.stack(accuracies)

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


def torch_conv_init(params, key):
    """Redraws every short-convolution kernel ("<q|k|v>_conv/kernel", [W, C]) from PyTorch's
    Conv1d default for a depthwise conv, U(−1/sqrt(W), 1/sqrt(W))."""
    import jax

    def redraw(path, x):
        names = [str(getattr(k, "key", k)) for k in path]
        if len(names) >= 2 and names[-1] == "kernel" and names[-2].endswith("_conv"):
            bound = 1.0 / math.sqrt(x.shape[0])
            sub = jax.random.fold_in(key, zlib.crc32("/".join(names).encode()) % (2 ** 31))
            return jax.random.uniform(sub, x.shape, x.dtype, -bound, bound)
        return x

    return jax.tree_util.tree_map_with_path(redraw, params)


def data_shapes(args) -> tuple:
    """Shapes of make_data's operands of the runner (train, tests), for compiling ahead (before
    the data exist)."""
    import jax
    import jax.numpy as jnp
    n_train, n_test = set_sizes(args)
    B, L = args.batch_size, train_row_len(args)
    row = jax.ShapeDtypeStruct((n_train, L), jnp.int32)
    train = (row, row, row if is_packed(args) else None)
    tests = tuple((jax.ShapeDtypeStruct((n_test // B, B, T), jnp.int32),) * 2
                  for T in args.seq_lens)
    return train, tests


def is_packed(args) -> bool:
    """Whether training rows hold several sequences (then the model gets segment ids)."""
    return any(T < train_row_len(args) for T, _, _ in args.train_mix)


def prepare(args, name: str, width: int, shapes: tuple) -> Prepared:
    """Builds model `name` at `width`, initialises it (seed args.seed) and compiles its runner
    for data of `shapes`. Thread-safe (flax's and jax's tracing state is per thread), so the
    sweep compiles the next runs while one trains."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from gsa_jax.optim import OptimConfig, make_optimizer

    start = time.perf_counter()
    config = model_config(name, width, args.vocab_size, args.dtype, args.impl,
                          not args.no_short_conv, args.attention_conv)
    model = build_model(config)
    params = nn.meta.unbox(model.init(jax.random.key(args.seed),
                                      jnp.zeros((1, 1), jnp.int32))["params"])
    if args.conv_init == "torch":
        params = torch_conv_init(params, jax.random.key(args.seed + 1))
    optim = OptimConfig(lr=1.0, warmup_steps=int(args.warmup_frac * args.steps),
                        min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
                        grad_clip=1.0)
    tx, _ = make_optimizer(optim, args.steps)
    opt_state = tx.init(params)
    runner = make_runner(model, tx, args.eval_every, args.batch_size)
    compiled = runner.lower(params, opt_state, jnp.int32(0), jnp.float32(0), *shapes).compile()
    return Prepared(name, width, config, params, opt_state, compiled,
                    int(sum(x.size for x in jax.tree.leaves(params))),
                    time.perf_counter() - start)


def fit(args, prep: Prepared, data: dict, on_chunk=None) -> list[dict[str, Any]]:
    """Trains a prepared model on data["train"] once per lr of args.lr (each from the same
    initial parameters), measuring the held-out accuracy on every test set each
    args.eval_every steps. Returns one row per test set: the lr with the best final accuracy
    on that set (ties: the lower final training loss), with every lr's results under "by_lr"."""
    import jax
    import jax.numpy as jnp

    init = (prep.params, prep.opt_state)
    prep.params = prep.opt_state = None
    runs = []
    start = time.perf_counter()
    for n, lr in enumerate(args.lr):
        if n == len(args.lr) - 1:
            params, opt_state = init   # the last run may consume (donate) the initial state
        else:
            params, opt_state = jax.tree.map(jnp.copy, init)
        curve, step = [], 0
        while step < args.steps:   # steps is a multiple of eval_every (checked)
            params, opt_state, loss, acc = prep.compiled(
                params, opt_state, jnp.int32(step), jnp.float32(lr), data["train"],
                data["tests"])
            step += args.eval_every
            point = {"step": step, "loss": float(loss), "accuracy": [float(a) for a in acc]}
            curve.append(point)
            if on_chunk is not None:
                on_chunk(point)
        runs.append((lr, curve))
        del params, opt_state
    init = None
    train_s = time.perf_counter() - start
    rows = []
    for i, (T, P) in enumerate(zip(args.seq_lens, args.kv_pairs)):
        by_lr = []
        for lr, curve in runs:
            sub = [{"step": p["step"], "loss": p["loss"], "accuracy": p["accuracy"][i]}
                   for p in curve]
            by_lr.append({"lr": lr, "accuracy": sub[-1]["accuracy"],
                          "best_accuracy": max(p["accuracy"] for p in sub),
                          "final_loss": sub[-1]["loss"], "curve": sub})
        best = max(by_lr, key=lambda r: (r["accuracy"], -r["final_loss"]))
        rows.append({"model": prep.name, "width": prep.width, "seq_len": T, "num_kv_pairs": P,
                     "test_queries": data["n_test"] * P, "params": prep.num_params,
                     "lr": best["lr"], "accuracy": best["accuracy"],
                     "best_accuracy": best["best_accuracy"], "final_loss": best["final_loss"],
                     "steps": args.steps, "compile_s": round(prep.compile_s, 2),
                     "train_s": round(train_s, 2), "curve": best["curve"],
                     "by_lr": by_lr if len(by_lr) > 1 else [],
                     "model_config": prep.config.to_dict()})
    return rows


def set_sizes(args) -> tuple[int, int]:
    """(training rows, held-out sequences per test set), rounded up to whole batches."""
    B = args.batch_size
    n_train = args.train_examples or args.steps * B
    return B * math.ceil(n_train / B), B * math.ceil(args.test_examples / B)


def task(args, seq_len: int, kv_pairs: int):
    from gsa_jax.data.mqar import MQARConfig
    return MQARConfig(vocab_size=args.vocab_size, seq_len=seq_len, num_kv_pairs=kv_pairs,
                      power_a=args.power_a, random_non_queries=not args.no_random_non_queries)


def make_data(args) -> dict:
    """The training mixture (packed rows) and the held-out set of each (T, P) to test, on the
    device (shared by every run)."""
    import jax.numpy as jnp
    from gsa_jax.data.mqar import generate, generate_packed

    B = args.batch_size
    n_train, n_test = set_sizes(args)
    L = train_row_len(args)
    # Independent draws for training and each test set (other seeds). Zoology warns of
    # train/test overlap: at V = 8192 a repeated sequence is astronomically unlikely (not so at
    # smoke sizes).
    train = generate_packed([task(args, T, P) for T, P, _ in args.train_mix],
                            [w for _, _, w in args.train_mix], n_train, L,
                            seed=args.seed * 1_000_003)
    tests = []
    for T, P in zip(args.seq_lens, args.kv_pairs):
        test = generate(task(args, T, P), n_test, seed=args.seed * 1_000_003 + 2 * T + 1)
        tests.append((jnp.asarray(test.inputs.reshape(-1, B, T)),
                      jnp.asarray(test.labels.reshape(-1, B, T))))
    return {"train": (jnp.asarray(train.inputs), jnp.asarray(train.labels),
                      jnp.asarray(train.segment_ids) if is_packed(args) else None),
            "tests": tuple(tests), "n_train": n_train, "n_test": n_test,
            "train_queries_per_row": float(train.mask.sum(axis=1).mean())}

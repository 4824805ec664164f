"""experiments/mqar.py's training path, in process at tiny sizes: the lr is an input of the
compiled runner and gives the same updates as the optimizer built with that lr; the runner's
held-out accuracy is the share of query positions predicted right; the training data is the
packed mixture of --train-mix (labels only at query positions, each answer the value bound in
its own segment) and its config is recorded; a grid of lrs reports the best per test set."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:   # `experiments` is not an installed package
    sys.path.insert(0, ROOT)

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from experiments import mqar  # noqa: E402
from gsa_jax.data.mqar import IGNORE  # noqa: E402

ARGV = ["--smoke", "--models", "attention", "--vocab-size", "32", "--widths", "16",
        "--seq-lens", "16", "32", "--kv-pairs", "2", "4", "--train-mix", "8:1:0.5", "16:2",
        "32:4:0.25", "--steps", "4", "--eval-every", "2", "--batch-size", "4",
        "--test-examples", "8", "--compile-ahead", "0"]


def test_parse_args_mixture_and_config():
    args = mqar.parse_args(ARGV + ["--lr", "1e-3", "3e-3"])
    assert args.train_mix == [(8, 1, 0.5), (16, 2, 1.0), (32, 4, 0.25)]
    assert mqar.train_row_len(args) == 32
    cfg = mqar.task_config(args)
    assert cfg["train_mix"] == [{"seq_len": 8, "num_kv_pairs": 1, "share": 0.285714},
                                {"seq_len": 16, "num_kv_pairs": 2, "share": 0.571429},
                                {"seq_len": 32, "num_kv_pairs": 4, "share": 0.142857}]
    assert cfg["train_row_len"] == 32 and cfg["lr"] == [1e-3, 3e-3]
    for bad in (["--train-mix", "16"], ["--train-mix", "16:2:0"], ["--train-mix", "a:b"],
                ["--train-mix", "16:8"], ["--kv-pairs", "9"], ["--lr", "0"]):
        with pytest.raises(SystemExit):
            mqar.parse_args(ARGV + bad)


def test_make_data_packs_the_mixture():
    args = mqar.parse_args(ARGV)
    data = mqar.make_data(args)
    x, y, seg = (np.asarray(a) for a in data["train"])
    assert x.shape == y.shape == seg.shape == (args.steps * args.batch_size, 32)
    for n in range(x.shape[0]):
        for s in np.unique(seg[n]):
            where = np.flatnonzero(seg[n] == s)
            xs, ys = x[n, where], y[n, where]
            queries = np.flatnonzero(ys != IGNORE)
            T = len(where)
            assert T in (8, 16, 32)       # every T divides 32: no padding
            P = T // 8   # the components (8, 1), (16, 2), (32, 4)
            assert len(queries) == P
            pairs = {int(xs[i]): int(xs[i + 1]) for i in range(0, 2 * P, 2)}
            for q in queries:   # a key of this segment, answered with its own value
                assert q >= 2 * P and int(ys[q]) == pairs[int(xs[q])]
    (tx16, ty16), (tx32, ty32) = data["tests"]
    assert tx16.shape == (2, 4, 16) and tx32.shape == (2, 4, 32)
    assert np.all((np.asarray(ty32) != IGNORE).sum(axis=-1) == 4)


@pytest.mark.slow  # over 30 s on a 2-core CPU: CI's second step
def test_traced_lr_matches_the_optimizer_and_accuracy():
    import flax.linen as nn
    import optax
    from gsa_jax.models import CausalLM
    from gsa_jax.optim import OptimConfig, loss_sums, make_optimizer

    args = mqar.parse_args(ARGV)
    data = mqar.make_data(args)
    model = CausalLM(mqar.model_config("attention", 16, 32, "float32", "auto"))
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    lr = 3e-2
    common = dict(warmup_steps=1, min_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0)
    tx1, _ = make_optimizer(OptimConfig(lr=1.0, **common), 4)
    runner = mqar.make_runner(model, tx1, 2, 4)
    copy = jax.tree.map(jnp.copy, params)
    got, _, _, acc = runner(copy, tx1.init(copy), jnp.int32(0), jnp.float32(lr),
                            data["train"], data["tests"])

    # The same two steps with the optimizer built at this lr.
    tx, _ = make_optimizer(OptimConfig(lr=lr, **common), 4)
    state = tx.init(params)
    x, y, seg = data["train"]
    want = params
    for i in range(2):
        xb, yb, sb = x[4 * i:4 * i + 4], y[4 * i:4 * i + 4], seg[4 * i:4 * i + 4]

        def loss(p):
            mask = yb != IGNORE
            s = loss_sums(model.apply({"params": p}, xb, segment_ids=sb),
                          jnp.where(mask, yb, 0), mask)
            return s.ce / s.count
        grads = jax.grad(loss)(want)
        updates, state = tx.update(grads, state, want)
        want = optax.apply_updates(want, updates)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)

    # Held-out accuracy: the share of query positions whose argmax is the label.
    for (tx_, ty_), a in zip(data["tests"], np.asarray(acc)):
        pred = np.argmax(np.asarray(model.apply({"params": got}, tx_.reshape(-1, tx_.shape[-1]))),
                         -1)
        labels = np.asarray(ty_).reshape(pred.shape)
        mask = labels != IGNORE
        assert np.isclose(a, np.sum((pred == labels) & mask) / mask.sum())


@pytest.mark.slow  # over 30 s on a 2-core CPU: CI's second step
def test_lr_grid_reports_the_best_per_test_set():
    args = mqar.parse_args(ARGV + ["--lr", "1e-4", "3e-2", "--conv-init", "torch"])
    data = mqar.make_data(args)
    shapes = mqar.data_shapes(args)   # known before the data exist: compiles start first
    assert jax.tree.map(lambda a: (a.shape, a.dtype), shapes) == \
        jax.tree.map(lambda a: (a.shape, a.dtype), (data["train"], data["tests"]))
    prep = mqar.prepare(args, "attention", 16, shapes)
    rows = mqar.fit(args, prep, data)
    assert [(r["seq_len"], r["num_kv_pairs"]) for r in rows] == [(16, 2), (32, 4)]
    for r in rows:
        assert [g["lr"] for g in r["by_lr"]] == [1e-4, 3e-2]
        best = max(r["by_lr"], key=lambda g: (g["accuracy"], -g["final_loss"]))
        assert r["lr"] == best["lr"] and r["accuracy"] == best["accuracy"]
        assert r["curve"] == best["curve"] and [p["step"] for p in r["curve"]] == [2, 4]
    # Both test sets come from the same training runs (the same loss curves).
    assert [g["curve"][-1]["loss"] for g in rows[0]["by_lr"]] == \
        [g["curve"][-1]["loss"] for g in rows[1]["by_lr"]]


@pytest.mark.slow  # ~10 s; CI runs it in its second step
def test_torch_conv_init_redraws_only_the_conv_kernels():
    import flax.linen as nn
    from gsa_jax.models import CausalLM
    model = CausalLM(mqar.model_config("gla", 16, 32, "float32", "auto"))
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    new = mqar.torch_conv_init(params, jax.random.key(1))
    flat_old = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    changed = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(new)[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if "_conv/kernel" in name:
            changed += 1
            width = leaf.shape[0]
            assert np.abs(leaf).max() <= 1 / np.sqrt(width) and np.std(leaf) > 0.2
        else:
            np.testing.assert_array_equal(leaf, flat_old[path])
    assert changed == 6   # q, k, v convs of both layers

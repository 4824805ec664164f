"""experiments/mqar_authors.py (the authors' MQAR setup) at tiny sizes: it runs end to end with
2 lrs x 2 seeds vmapped; the vmapped runs equal the same runs trained one by one by a plain
optax loop (cosine schedule, AdamW); a frozen run (early stop) keeps its parameters and
optimizer state exactly; two partial reports merge; every model and ABC's cumulative
normaliser are causal."""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:   # `experiments` is not an installed package
    sys.path.insert(0, ROOT)

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from experiments import mqar_authors as ma, mqar_report  # noqa: E402

TINY = ["--smoke", "--vocab-size", "32", "--seq-len", "16", "--kv-pairs", "2",
        "--train-examples", "64", "--test-examples", "20", "--batch-size", "16", "--widths", "8",
        "--lr", "3e-3", "2e-2", "--seeds", "2"]


@pytest.mark.slow   # ~75 s on a busy 2-core CPU (a GLA compile of the vmapped program)
def test_end_to_end_two_lrs_two_seeds(tmp_path):
    from pallas_kernels import gla as kernels
    argv = TINY + ["--models", "gla", "--max-epochs", "2", "--eval-every", "2", "--tag", "t",
                   "--out-dir", str(tmp_path)]
    with kernels.tuning(warps_par=2):   # launch parameters are recorded (no effect on a CPU)
        assert ma.main(argv) == 0
    record = json.loads((tmp_path / "mqar_authors_t.json").read_text())
    (cell,) = record["cells"]
    assert cell["kernel_tuning"] == {"warps_par": 2}
    assert "speed only): GLA D=8 {'warps_par': 2}." in (tmp_path / "mqar_authors_t.md").read_text()
    assert (cell["model"], cell["width"], cell["epochs_done"]) == ("gla", 8, 2)
    assert cell["stop_reason"] == "max epochs" and cell["steps_done"] == 8
    assert sorted((r["lr"], r["seed"]) for r in cell["runs"]) == [
        (3e-3, 0), (3e-3, 1), (2e-2, 0), (2e-2, 1)]
    assert all(len(r["curve"]) == 4 for r in cell["runs"])   # 8 steps / eval every 2
    assert cell["step_s"] > 0 and cell["tokens_per_s"] > 0
    assert (tmp_path / "mqar_authors_t.md").exists() and (tmp_path / "mqar_authors_t.png").exists()


@pytest.mark.slow   # five small attention compiles (~40 s on 2 cores): CI's second step
def test_paused_cell_resumes_exactly(tmp_path):
    """A cell paused after every chunk (--pause-seconds 0) and resumed call by call from
    --state-dir (its state in several small parts) ends with the curves and the parameters and
    optimizer states of the same cell trained in one call; a state saved by another setup (other
    lrs) is refused, not silently restarted."""
    base = TINY + ["--eval-every", "2", "--max-epochs", "2"]
    quiet = lambda *_: None  # noqa: E731
    one_go = ma.parse_args(base + ["--state-dir", str(tmp_path / "a")])
    data = ma.make_data(one_go)
    straight = ma.train_cell("attention", 8, one_go, data, log=quiet)
    paused = ma.parse_args(base + ["--state-dir", str(tmp_path / "b"), "--pause-seconds", "0",
                                   "--state-part-mb", "0.01"])
    cells = []
    while not cells or cells[-1]["stop_reason"].startswith("paused"):
        cells.append(ma.train_cell("attention", 8, paused, data, log=quiet))
        assert len(cells) <= 4
    assert [c["steps_done"] for c in cells] == [2, 4, 6, 8] and cells[-1]["calls"] == 4
    # chunk times survive the pauses: one per chunk so far, in each call's report
    assert [len(c["chunk_seconds"]) for c in cells] == [1, 2, 3, 4]
    # the GPU that trained it is recorded once per machine, not once per call
    assert cells[-1]["devices"] == straight["devices"] == [jax.devices()[0].device_kind]
    assert cells[-1]["kernel_tuning"] == {}   # the defaults: nothing to record
    assert len(straight["chunk_seconds"]) == 4
    assert cells[-1]["stop_reason"] == straight["stop_reason"] == "max epochs"
    assert [r["curve"] for r in cells[-1]["runs"]] == [r["curve"] for r in straight["runs"]]
    prefix = lambda d: str(tmp_path / d / "attention_D8")  # noqa: E731
    from experiments.mqar_authors_train import state_files
    assert len(state_files(prefix("b"))) > 1
    (meta_a, leaves_a), (meta_b, leaves_b) = (ma.load_cell_state(prefix(d)) for d in "ab")
    assert meta_a["step"] == meta_b["step"] == 8
    for a, b in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(a, b)
    other = ma.parse_args(TINY[:-5] + ["--lr", "1e-3", "2e-2", "--seeds", "2", "--eval-every",
                                       "2", "--max-epochs", "2", "--state-dir",
                                       str(tmp_path / "b")])
    with pytest.raises(ValueError, match="another setup"):
        ma.train_cell("attention", 8, other, data, log=quiet)


def _setup(model="gla", extra=()):
    args = ma.parse_args(TINY + ["--eval-every", "3", "--max-epochs", "2", *extra])
    data = ma.make_data(args)
    m = ma.build(model, 8, args)
    return args, data, m


def _reference_run(model, args, data, lr, seed, steps):
    """One run by a plain loop: its own init, optax.adamw with a cosine schedule, the shuffle
    and dropout keys of the documented convention; returns (params, per-step losses)."""
    import flax.linen as nn
    import optax
    from gsa_jax.data.mqar import IGNORE
    E = ma.steps_per_epoch(args)
    total = args.max_epochs * E
    params = nn.meta.unbox(model.init(jax.random.key(seed),
                                      jnp.zeros((1, args.seq_len), jnp.int32))["params"])
    tx = optax.adamw(optax.cosine_decay_schedule(lr, total, alpha=0.0), b1=0.9, b2=0.999,
                     eps=1e-8, weight_decay=args.weight_decay)
    opt = tx.init(params)
    key = jax.random.fold_in(jax.random.key(seed), 1)
    drop_key = jax.random.fold_in(key, 2 ** 32 - 1)
    x_all, y_all = (np.asarray(a) for a in data["train"])

    def loss_fn(p, x, y, k):
        logits = model.apply({"params": p}, x, train=True, rngs={"dropout": k})
        logp = jax.nn.log_softmax(logits)
        mask = y != IGNORE
        nll = -jnp.take_along_axis(logp, jnp.where(mask, y, 0)[..., None], -1)[..., 0]
        return jnp.sum(nll * mask) / jnp.sum(mask)

    @jax.jit
    def step(params, opt, x, y, k):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y, k)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    losses = []
    for t in range(steps):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, t // E),
                                                 x_all.shape[0]))
        rows = perm[(t % E) * args.batch_size:(t % E + 1) * args.batch_size]
        params, opt, loss = step(params, opt, x_all[rows], y_all[rows],
                                 jax.random.fold_in(drop_key, t))
        losses.append(float(loss))
    return params, losses


@pytest.mark.slow   # three small attention compiles (~30 s on 2 cores): CI's second step
def test_seed_parts_train_the_runs_of_the_whole_cell():
    """A cell trained as parts by seed (--seeds 1 --first-seed S, one process each) has the
    runs of the cell trained whole: each part's curves equal the whole cell's runs of its seed
    (same initialisation, data order and dropout), and the report joins the parts into the
    whole cell's runs, order and summary."""
    # a fresh data set each time (the runs' own seeds are what the parts split)
    data_seed = str(np.random.default_rng().integers(1, 10_000))
    base = TINY + ["--eval-every", "2", "--max-epochs", "1", "--data-seed", data_seed]
    quiet = lambda *_: None  # noqa: E731
    whole_args = ma.parse_args(base)
    data = ma.make_data(whole_args)
    whole = ma.train_cell("attention", 8, whole_args, data, log=quiet)
    parts = [ma.train_cell("attention", 8, ma.parse_args(
        base + ["--seeds", "1", "--first-seed", str(seed)]), data, log=quiet) for seed in (1, 0)]
    for seed, part in zip((1, 0), parts):
        assert part["seed_ids"] == [seed] and {r["seed"] for r in part["runs"]} == {seed}
        mine = [r for r in whole["runs"] if r["seed"] == seed]
        assert [r["lr"] for r in part["runs"]] == [r["lr"] for r in mine]
        for a, b in zip(part["runs"], mine):
            np.testing.assert_allclose([p["loss"] for p in a["curve"]],
                                       [p["loss"] for p in b["curve"]], rtol=1e-5)
            assert [p["accuracy"] for p in a["curve"]] == pytest.approx(
                [p["accuracy"] for p in b["curve"]], abs=1e-6)
    rec = lambda *cells: _record(ma.task_config(whole_args), *cells)  # noqa: E731
    [joined] = ma.finish(ma.merge(rec(parts[0]), rec(parts[1])))["cells"]
    [reference] = ma.finish(rec(whole))["cells"]
    assert [(r["lr"], r["seed"]) for r in joined["runs"]] == [
        (r["lr"], r["seed"]) for r in reference["runs"]]
    assert joined["seeds"] == 2 and joined["seed_ids"] == [0, 1]
    assert joined["summary"]["lr"] == reference["summary"]["lr"]
    assert joined["summary"]["mean"] == pytest.approx(reference["summary"]["mean"], abs=1e-6)


@pytest.mark.slow   # 45 s (attention) and 160 s (GSA) on a busy 2-core CPU
@pytest.mark.parametrize("model", ["gsa", "attention"])
def test_vmapped_runs_equal_runs_one_by_one(model):
    args, data, m = _setup(model)
    lrs, seeds = ma.run_grid(args)
    E = ma.steps_per_epoch(args)   # 4: the second chunk (steps 3..5) crosses an epoch
    params, opt = ma.init_runs(m, args, [0, 1], seeds)
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), 1))(jnp.asarray(seeds))
    chunk = jax.jit(jax.vmap(ma.make_chunk(m, args), in_axes=(0, 0, 0, 0, 0, None, None, None,
                                                              None)))
    frozen = jnp.zeros(len(lrs), bool)
    losses = []
    for step0 in (0, 3):
        params, opt, loss, _ = chunk(params, opt, frozen, jnp.asarray(lrs, jnp.float32), keys,
                                     jnp.int32(step0), jnp.int32(args.max_epochs * E),
                                     data["train"], data["test"])
        losses.append(np.asarray(loss))
    for r, (lr, seed) in enumerate(zip(lrs, seeds)):
        ref, ref_losses = _reference_run(m, args, data, lr, seed, 6)
        np.testing.assert_allclose([losses[0][r], losses[1][r]],
                                   [np.mean(ref_losses[:3]), np.mean(ref_losses[3:])],
                                   rtol=1e-5)
        ours = jax.tree.map(lambda x: x[r], params)
        if model == "attention":
            # The key bias gets no gradient (it shifts a query's scores by one constant, which
            # the softmax removes): only float noise, that Adam's normalisation turns into
            # steps of any sign. Not comparable; dropped from both sides.
            for p in (ours, ref):
                for i in range(args.num_layers):
                    b = p[f"mixer_{i}"]["Wqkv"]["bias"]
                    p[f"mixer_{i}"]["Wqkv"]["bias"] = jnp.concatenate([b[:8], b[16:]])
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
            # Adam divides by sqrt(v): float32 reorderings of tiny gradients move a parameter
            # by ~1e-5 at most (an lr-2e-2 step is ~100x that).
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)


@pytest.mark.slow  # ~19 s; CI runs it in its second step
def test_frozen_run_keeps_its_state_exactly():
    args, data, m = _setup("attention", ["--num-layers", "1"])
    lrs, seeds = ma.run_grid(args)
    params, opt = ma.init_runs(m, args, [0, 1], seeds)
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), 1))(jnp.asarray(seeds))
    chunk = jax.jit(jax.vmap(ma.make_chunk(m, args), in_axes=(0, 0, 0, 0, 0, None, None, None,
                                                              None)))
    frozen = jnp.asarray([True, False, True, False])
    new_p, new_o, _, _ = chunk(params, opt, frozen, jnp.asarray(lrs, jnp.float32), keys,
                               jnp.int32(0), jnp.int32(8), data["train"], data["test"])
    for old, new in ((params, new_p), (opt, new_o)):
        for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)):
            a, b = np.asarray(a), np.asarray(b)
            np.testing.assert_array_equal(a[[0, 2]], b[[0, 2]])
    moved = [not np.array_equal(np.asarray(a)[[1, 3]], np.asarray(b)[[1, 3]])
             for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new_p))]
    assert all(moved)


@pytest.mark.slow  # ~9 s; CI runs it in its second step
def test_cell_stops_when_every_run_passed_the_threshold(monkeypatch):
    args, data, _ = _setup("attention", ["--max-epochs", "5", "--num-layers", "1"])
    monkeypatch.setattr(ma, "STOP_ACCURACY", -1.0)   # every run passes after its first chunk
    cell = ma.train_cell("attention", 8, args, data, log=lambda *_: None)
    assert cell["stop_reason"] == "all runs early-stopped" and cell["steps_done"] == 3
    assert all(r["stopped_epoch"] == 0.75 and len(r["curve"]) == 1 for r in cell["runs"])


@pytest.mark.slow  # three small attention compiles (~20 s on 2 cores)
def test_stopped_runs_left_out_train_the_others_as_masked(tmp_path):
    """Runs 1 and 2 marked early-stopped in a paused cell's state: resumed with them left out of
    the chunks (the default) or kept in and masked (--no-compact-stopped), the other two runs
    end with the same curves and parameters (to float rounding: a vmap over 2 runs instead of
    4), the stopped ones exactly as saved, and tokens/s counts the runs that trained."""
    import shutil
    from experiments.mqar_authors_train import save_cell_state
    quiet = lambda *_: None  # noqa: E731
    base = TINY + ["--eval-every", "2", "--max-epochs", "2", "--num-layers", "1"]
    first = ma.parse_args(base + ["--state-dir", str(tmp_path / "s"), "--pause-seconds", "0"])
    data = ma.make_data(first)
    assert ma.train_cell("attention", 8, first, data, log=quiet)["steps_done"] == 2
    prefix = str(tmp_path / "s" / "attention_D8")
    meta, leaves = ma.load_cell_state(prefix)
    meta["stopped"] = [None, 0.5, 0.5, None]
    save_cell_state(prefix, meta, leaves, 15.0)
    cells, states = {}, {}
    for name, extra in (("left_out", []), ("masked", ["--no-compact-stopped"])):
        shutil.copytree(tmp_path / "s", tmp_path / name)
        args = ma.parse_args(base + ["--state-dir", str(tmp_path / name), *extra])
        cells[name] = ma.train_cell("attention", 8, args, data, log=quiet)
        states[name] = ma.load_cell_state(str(tmp_path / name / "attention_D8"))[1]
    for cell in cells.values():
        assert cell["stop_reason"] == "max epochs" and cell["steps_done"] == 8
        assert [len(r["curve"]) for r in cell["runs"]] == [4, 1, 1, 4]
    for r in (0, 3):
        a, b = (cells[n]["runs"][r]["curve"] for n in ("left_out", "masked"))
        assert [c["step"] for c in a] == [c["step"] for c in b]
        np.testing.assert_allclose([c["loss"] for c in a], [c["loss"] for c in b], rtol=1e-5)
    moved = 0
    for saved, left_out, masked in zip(leaves, states["left_out"], states["masked"],
                                       strict=True):
        if saved.ndim == 0 or saved.shape[0] != 4:
            continue
        for r in (1, 2):   # stopped: untouched by either
            np.testing.assert_array_equal(left_out[r], saved[r])
            np.testing.assert_array_equal(masked[r], saved[r])
        np.testing.assert_allclose(left_out[[0, 3]], masked[[0, 3]], rtol=1e-4, atol=1e-6)
        moved += not np.array_equal(left_out[[0, 3]], saved[[0, 3]])
    assert moved > 0
    # 4 runs trained the first 2 steps, 2 runs the other 6: per step of the cell B x T x
    # (2 * 4 + 6 * 2) / 8 tokens (step_s is rounded to 1e-5 s, hence the tolerance)
    for cell in cells.values():
        tokens_per_step = 16 * 16 * (2 * 4 + 6 * 2) / 8
        assert cell["tokens_per_s"] == pytest.approx(tokens_per_step / cell["step_s"], rel=1e-2)
        assert cell["tokens_per_s"] < 16 * 16 * 4 / cell["step_s"] * 0.9


def _record(config, *cells):
    """A report record of `cells` under `config` (what merge and finish take)."""
    return {"tag": "t", "config": config, "commands": [], "cells": list(cells)}


def _cell(model, width, accs, losses, lrs=(1e-3, 1e-2)):
    runs = [{"lr": lr, "seed": s, "stopped_epoch": None,
             "curve": [{"step": 1, "epoch": 1, "loss": l, "accuracy": a}]}
            for (lr, s), a, l in zip([(lr, s) for s in range(2) for lr in lrs], accs, losses)]
    return {"model": model, "width": width, "params": 1, "state_size": 1, "lrs": list(lrs),
            "seeds": 2, "max_epochs": 4, "epochs_done": 4, "steps_done": 4,
            "stop_reason": "max epochs", "cell_seconds": None, "compile_s": 1.0, "train_s": 1.0,
            "step_s": 0.1, "tokens_per_s": 10, "runs": runs}


def test_step_time_of_cells_that_computed_their_stopped_runs_is_marked():
    """A cell whose early-stopped runs stayed in its later steps (masked: cells from before they
    were left out, or --no-compact-stopped) has a step time that counts them: the report marks
    it; one that left them out, or had none stopped, is not marked."""
    cfg = ma.task_config(ma.parse_args(TINY))
    masked = _cell("attention", 8, [1.0, 0.5, 1.0, 0.5], [0.1] * 4)
    masked["runs"][0]["stopped_epoch"] = 2.5
    left_out = {**_cell("gsa", 8, [1.0, 0.5, 1.0, 0.5], [0.1] * 4), "stopped_runs_left_out": True}
    left_out["runs"][2]["stopped_epoch"] = 3.0
    none_stopped = _cell("gla", 8, [0.5] * 4, [1.0] * 4)   # no key, no stopped run
    record = ma.finish({"tag": "t", "config": cfg, "commands": [],
                        "cells": [masked, left_out, none_stopped]})
    rows = {line.split(" | ")[0]: line for line in ma.markdown(record).splitlines()
            if line.startswith("| ") and " | 8 | " in line}
    assert [("0.1000 † |" in rows[f"| {m}"]) for m in ("Attention", "GSA", "GLA")] == [
        True, False, False]
    assert "† this cell's early-stopped runs stayed in its later steps" in ma.markdown(record)


def test_merge_summary_plateau_and_verdicts():
    rng = np.random.default_rng(0)
    cfg = ma.task_config(ma.parse_args(TINY))
    V = cfg["vocab_size"]
    plateau = math.log(V / 2)
    acc = rng.uniform(0.3, 0.6, 4)
    first = {"tag": "t", "config": cfg, "commands": ["a"], "cells": [
        _cell("gsa", 8, [0.9, acc[0], 0.95, acc[1]], [1.0, 2.0, 1.0, 2.0]),
        _cell("gla", 8, [0.01, 0.02, 0.0, 0.01], [plateau, plateau + 0.1, plateau, plateau])]}
    second = {"tag": "t", "config": cfg, "commands": ["b"], "cells": [
        _cell("retnet", 8, list(acc), [1.5] * 4),
        _cell("attention", 8, [1.0, 1.0, 1.0, 1.0], [0.1] * 4),
        _cell("gla", 8, [0.2, 0.4, 0.3, 0.5], [3.0] * 4)]}   # redoes gla: replaces it
    merged = ma.finish(ma.merge(first, second))
    assert merged["commands"] == ["a", "b"]
    cells = {c["model"]: c for c in merged["cells"]}
    assert sorted(cells) == sorted(ma.MODELS) and math.isclose(cells["gla"]["summary"]["mean"], 0.45)
    gsa = cells["gsa"]["summary"]
    assert gsa["lr"] == 1e-3 and math.isclose(gsa["mean"], 0.925)
    assert (gsa["min"], gsa["max"]) == (0.9, 0.95)
    best_ret = max((np.mean(acc[[0, 2]]), 1e-3), (np.mean(acc[[1, 3]]), 1e-2))
    assert cells["retnet"]["summary"]["lr"] == best_ret[1]
    verdict = {v["claim"]: v["summary"] for v in merged["verdicts"]}
    assert verdict == {"GSA ≥ GLA": "holds", "GSA ≥ RetNet": "holds",
                       "GSA, GLA, RetNet ≤ attention": "holds"}
    text = ma.markdown(merged)
    assert "HOLDS" in text and "| GSA | 92.5 (90.0–95.0) |" in text
    with pytest.raises(ValueError, match="other settings"):
        ma.merge(first, {**second, "config": {**cfg, "seq_len": 64}})
    # A cell whose runs never left ln(V/2) is reported as plateau, not an accuracy.
    flat = ma.summarise(first["cells"][1], V)
    assert flat["plateau"] and ma.fmt_cell(flat) == "plateau"


@pytest.mark.parametrize("model", ma.MODELS)
def test_models_are_causal(model):
    """Changing tokens after t leaves the logits at positions <= t exactly unchanged."""
    args = ma.parse_args(TINY)
    m = ma.build(model, 8, args)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 32, (2, 16)).astype(np.int32)
    params = m.init(jax.random.key(0), jnp.asarray(x))["params"]
    base = np.asarray(m.apply({"params": params}, jnp.asarray(x)))
    for t in (0, 7, 14):
        y = x.copy()
        y[:, t + 1:] = rng.integers(0, 32, y[:, t + 1:].shape)
        out = np.asarray(m.apply({"params": params}, jnp.asarray(y)))
        np.testing.assert_array_equal(out[:, :t + 1], base[:, :t + 1])
        assert not np.array_equal(out[:, t + 1:], base[:, t + 1:])


@pytest.mark.slow  # ~9 s; CI runs it in its second step
def test_abc_cumulative_normaliser_is_causal():
    """ABC (GSA, gate="none"): z_t = logcumsumexp(e)_{<=t} must not see e_{t+1..}: perturbing the
    input after t leaves outputs <= t exactly unchanged."""
    import flax.linen as nn
    from gsa_jax.layers import GatedSlotAttention
    layer = GatedSlotAttention(16, num_heads=2, num_slots=4, gate="none")
    x = np.random.default_rng(2).standard_normal((2, 12, 16)).astype(np.float32)
    params = nn.meta.unbox(layer.init(jax.random.key(0), jnp.asarray(x))["params"])
    base = np.asarray(layer.apply({"params": params}, jnp.asarray(x))[0])
    for t in range(11):
        y = x.copy()
        y[:, t + 1:] += 3.0 * np.random.default_rng(t).standard_normal(y[:, t + 1:].shape)
        out = np.asarray(layer.apply({"params": params}, jnp.asarray(y))[0])
        np.testing.assert_array_equal(out[:, :t + 1], base[:, :t + 1])
        assert not np.allclose(out[:, t + 1:], base[:, t + 1:])


def test_merge_files_of_two_calls(tmp_path):
    """Two calls' reports (e.g. two GPU calls' $OUT) combine with --merge-only --merge-files;
    each cell keeps the GPUs that trained it (a cell from before cells recorded it gets its
    report's machine)."""
    cfg = ma.task_config(ma.parse_args(TINY))
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"tag": "a", "config": cfg, "commands": ["call 1"],
                             "environment": {"device_kind": "NVIDIA H200"},
                             "cells": [_cell("gsa", 8, [0.5] * 4, [1.0] * 4)]}))
    # b was merged onto a before its call (the same history): its copy of "call 1" is not
    # repeated; its cell paused on one GPU and resumed on another
    gla = {**_cell("gla", 16, [0.25] * 4, [2.0] * 4),
           "devices": ["NVIDIA H100 80GB HBM3", "NVIDIA H200"]}
    b.write_text(json.dumps({"tag": "b", "config": cfg, "commands": ["call 1", "call 2"],
                             "environment": {"device_kind": "NVIDIA H200"}, "cells": [gla]}))
    assert ma.main(TINY + ["--merge-only", "--merge-files", str(a), str(b), "--tag", "m",
                           "--out-dir", str(tmp_path)]) == 0
    merged = json.loads((tmp_path / "mqar_authors_m.json").read_text())
    assert sorted((c["model"], c["width"]) for c in merged["cells"]) == [("gla", 16), ("gsa", 8)]
    assert merged["commands"][:2] == ["call 1", "call 2"]
    assert merged["commands"].count("call 1") == 1
    assert {c["model"]: c["devices"] for c in merged["cells"]} == {
        "gsa": ["NVIDIA H200"], "gla": ["NVIDIA H100 80GB HBM3", "NVIDIA H200"]}
    text = (tmp_path / "mqar_authors_m.md").read_text()
    assert "| GSA | 50.0 (50.0–50.0) | - |" in text
    assert text.count("| H200 |") == 1 and "| H100 80GB HBM3, H200 |" in text
    assert "more than one GPU (H200, H100 80GB HBM3;" in text


def test_near_chance_cells_are_not_ordered():
    """Two cells that both stay under LEARNED_ACCURACY test no claim at that width; one that
    learned against one that did not still does."""
    cfg = ma.task_config(ma.parse_args(TINY))
    low = lambda m, w: _cell(m, w, [0.012, 0.02, 0.01, 0.018], [7.0] * 4)   # noqa: E731
    cells = [low("gsa", 8), low("gla", 8), _cell("gsa", 16, [0.6, 0.5, 0.7, 0.4], [2.0] * 4),
             low("gla", 16)]
    record = ma.finish({"tag": "t", "config": cfg, "commands": ["a"], "cells": cells})
    gla = {v["claim"]: v for v in record["verdicts"]}["GSA ≥ GLA"]
    assert [c["width"] for c in gla["cells"]] == [16] and gla["summary"] == "holds"
    only_low = ma.finish({"tag": "t", "config": cfg, "commands": ["a"], "cells": cells[:2]})
    assert {v["claim"]: v["summary"] for v in only_low["verdicts"]}["GSA ≥ GLA"] == "not testable"


def test_cells_trained_in_parts_join_in_the_report():
    """A cell whose lrs were trained in separate processes (parts) is one cell in the merged
    report, equal to the cell trained whole: same runs in the same order, same best lr and
    summary; a later part with one of its lrs redoes that part only, one that spans parts
    redoes the cell; the table gives each part's step time."""
    rng = np.random.default_rng()
    cfg = ma.task_config(ma.parse_args(TINY))
    acc, loss = rng.uniform(0.1, 0.9, 4), rng.uniform(1.0, 3.0, 4)
    whole = _cell("gsa", 8, acc, loss)   # runs seed-major: (1e-3, 0), (1e-2, 0), (1e-3, 1), ...
    part = lambda lr, i, step_s: {**_cell("gsa", 8, acc[i], loss[i], lrs=(lr,)),  # noqa: E731
                                  "step_s": step_s, "devices": [f"GPU {lr:g}"]}
    rec = lambda *cells: _record(cfg, *cells)  # noqa: E731
    joined = ma.finish(ma.merge(rec(part(1e-2, [1, 3], 0.2)), rec(part(1e-3, [0, 2], 0.1))))
    [cell] = joined["cells"]
    reference = ma.finish(rec(whole))["cells"][0]
    key = lambda r: (r["lr"], r["seed"], r["curve"][0]["accuracy"])   # noqa: E731
    assert [key(r) for r in cell["runs"]] == [key(r) for r in reference["runs"]]
    assert cell["lrs"] == [1e-3, 1e-2] and cell["summary"] == reference["summary"]
    assert [p["lrs"] for p in cell["parts"]] == [[1e-2], [1e-3]]
    assert cell["devices"] == ["GPU 0.01", "GPU 0.001"] and cell["train_s"] == 2.0
    row = [line for line in ma.markdown(joined).splitlines() if line.startswith("| GSA | 8 |")]
    assert " | 0.2000 ; 0.1000 | " in row[0] and "Cells trained in parts" in ma.markdown(joined)
    # a redone part replaces its own runs only
    redo = ma.finish(ma.merge(joined, rec({**part(1e-2, [1, 3], 0.3), "runs": [
        {**r, "curve": [{**r["curve"][0], "accuracy": 0.99}]}
        for r in part(1e-2, [1, 3], 0.3)["runs"]]})))
    [cell] = redo["cells"]
    assert {r["lr"]: r["curve"][0]["accuracy"] for r in cell["runs"] if r["lr"] == 1e-2} == {
        1e-2: 0.99}
    assert sorted(r["curve"][0]["accuracy"] for r in cell["runs"] if r["lr"] == 1e-3) == sorted(
        acc[[0, 2]])
    assert [p["step_s"] for p in cell["parts"]] == [0.1, 0.3]
    # a cell that spans both parts redoes the cell
    again = ma.finish(ma.merge(joined, rec(_cell("gsa", 8, acc[::-1], loss))))
    assert "parts" not in again["cells"][0] and len(again["cells"][0]["runs"]) == 4
    # a part of another epoch cap is another cell: it replaces, it does not join
    longer = ma.finish(ma.merge(rec(part(1e-2, [1, 3], 0.2)),
                                rec({**part(1e-3, [0, 2], 0.1), "max_epochs": 8})))
    assert "parts" not in longer["cells"][0] and longer["cells"][0]["lrs"] == [1e-3]


def test_cells_trained_in_parts_by_seed_join_in_the_report():
    """Parts of one cell split by seed (and by lr) join into the cell trained whole: same runs,
    order and summary; the parts line names each part's seeds; an lr that ran fewer seeds than
    the others is named in the cut list until its other seed's part joins; a part redone for
    one (lr, seed) replaces that part only."""
    rng = np.random.default_rng()
    cfg = ma.task_config(ma.parse_args(TINY))
    acc, loss = rng.uniform(0.1, 0.9, 4), rng.uniform(1.0, 3.0, 4)
    whole = _cell("gsa", 8, acc, loss)   # runs seed-major: (1e-3, 0), (1e-2, 0), (1e-3, 1), ...

    def part(lr, seed, i):
        cell = _cell("gsa", 8, [acc[i]] * 2, [loss[i]] * 2, lrs=(lr,))
        runs = [{**r, "seed": seed} for r in cell["runs"][:1]]
        return {**cell, "seeds": 1, "seed_ids": [seed], "runs": runs}

    rec = lambda *cells: _record(cfg, *cells)  # noqa: E731
    # a cell of one seed's parts so far is cut: its ranges are one run each
    lone = ma.finish(ma.merge(rec(part(1e-2, 0, 1)), rec(part(1e-3, 0, 0))))
    cut = [line for line in ma.markdown(lone).splitlines() if "Cut relative" in line][0]
    assert "fewer than 2 seeds" in cut and "GSA D=8 (seed 0)" in cut
    # the table and the plot mark it unfinished, as a paused cell; a cell run to its cap is not
    assert mqar_report.provisional(lone["cells"][0]) == "1 seed"
    paused = {**whole, "epochs_done": 2, "stop_reason": "paused (resumes from --state-dir)"}
    assert mqar_report.provisional(paused) == "2/4 epochs"
    assert mqar_report.provisional(whole) == ""
    page = ma.markdown(lone)
    assert "‡ unfinished, the value may still move: GSA D=8 (1 seed)." in page
    assert [line for line in page.splitlines() if line.startswith("| GSA |")][0].endswith(" ‡ |")
    first = ma.finish(ma.merge(rec(part(1e-2, 0, 1)), rec(part(1e-3, 0, 0))))
    first = ma.finish(ma.merge(first, rec(part(1e-3, 1, 2))))
    [cell] = first["cells"]
    assert cell["seeds"] == 2 and mqar_report.thin_lrs(cell) == [(1e-2, [0])]
    cut = [line for line in ma.markdown(first).splitlines() if "Cut relative" in line][0]
    assert "GSA D=8 lr 0.01 (seed 0 of 0 1)" in cut and "fewer than 2 seeds" not in cut
    assert "lr 0.01 at 1 of 2 seeds" in mqar_report.fmt_open(mqar_report.open_cell(cell))
    joined = ma.finish(ma.merge(first, rec(part(1e-2, 1, 3))))
    [cell] = joined["cells"]
    [reference] = ma.finish(rec(whole))["cells"]
    key = lambda r: (r["lr"], r["seed"], r["curve"][0]["accuracy"])   # noqa: E731
    assert [key(r) for r in cell["runs"]] == [key(r) for r in reference["runs"]]
    assert cell["summary"] == reference["summary"] and mqar_report.thin_lrs(cell) == []
    parts_line = [line for line in ma.markdown(joined).splitlines()
                  if line.startswith("Cells trained in parts")][0]
    assert "GSA D=8: 0.01 (seed 0) ; 0.001 (seed 0) ; 0.001 (seed 1) ; 0.01 (seed 1)" in parts_line
    # a redone (lr, seed) replaces its own part only
    redo = ma.finish(ma.merge(joined, rec({**part(1e-3, 1, 2), "runs": [
        {**part(1e-3, 1, 2)["runs"][0], "curve": [{"step": 1, "epoch": 1, "loss": 0.5,
                                                   "accuracy": 0.99}]}]})))
    [cell] = redo["cells"]
    assert len(cell["parts"]) == 4 and len(cell["runs"]) == 4
    assert {(r["lr"], r["seed"]): r["curve"][0]["accuracy"] for r in cell["runs"]}[
        (1e-3, 1)] == 0.99
    # a whole cell (both seeds of both lrs) spans every part: it replaces them
    again = ma.finish(ma.merge(joined, rec(whole)))
    assert "parts" not in again["cells"][0] and len(again["cells"][0]["runs"]) == 4


def test_first_seed_sets_the_runs_seeds_and_bad_grids_are_refused():
    """--first-seed S trains seeds S .. S + seeds - 1 (seed-major runs as the whole cell's);
    a negative first seed or an lr given twice is refused."""
    args = ma.parse_args(TINY + ["--seeds", "2", "--first-seed", "3"])
    assert ma.run_grid(args) == ([3e-3, 2e-2, 3e-3, 2e-2], [3, 3, 4, 4])
    assert ma.run_grid(ma.parse_args(TINY)) == ([3e-3, 2e-2, 3e-3, 2e-2], [0, 0, 1, 1])
    for bad in (["--first-seed", "-1"], ["--lr", "1e-3", "1e-3"]):
        with pytest.raises(SystemExit):
            ma.parse_args(TINY + bad)


def test_cut_lr_grid_is_the_authors_grid_of_each_model():
    """GSA's cells are held to the authors' GSA grid, the baselines' to the grid their runs used
    (np.logspace(-4, -2, 4), shared/PAPER.md §4); an lr within 10% of a grid point covers it."""
    grid = list(np.logspace(-4, -2, 4))
    assert np.allclose(mqar_report.BASELINE_LRS, grid, rtol=5e-3)   # 3 digits
    assert mqar_report.untried_lrs("attention", [2e-3, 5e-3]) == [
        mqar_report.BASELINE_LRS[i] for i in (0, 1, 3)]
    assert mqar_report.untried_lrs("gla", [1e-4, 4.6e-4, 2e-3, 1e-2]) == []
    assert mqar_report.untried_lrs("gsa", [2e-3, 5e-3]) == [1e-4, 5e-4, 1e-3, 1e-2]
    cfg = ma.task_config(ma.parse_args(TINY))
    record = ma.finish({"tag": "t", "config": cfg, "commands": ["a"], "cells": [
        _cell("gsa", 8, [0.5] * 4, [2.0] * 4, lrs=(2e-3, 5e-3)),
        _cell("retnet", 8, [0.5] * 4, [2.0] * 4, lrs=(4.64e-4, 2.15e-3))]})
    cut = [line for line in ma.markdown(record).splitlines() if "lr grid smaller" in line][0]
    assert "GSA grid {0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01}: GSA D=8" in cut
    assert "RetNet D=8 (ran 0.000464 0.00215; untried 0.0001 0.01)" in cut


def test_verdicts_order_cells_by_their_seed_ranges():
    """Two seeds' means order nothing while their ranges overlap: a claim fails at a width only
    where every run of the claimed-better model is below every run of the other (the GPU sweep's
    attention D = 128, 1.7% and 1.7%, against GSA's 7.6% and 97.0%: a mean-difference rule with
    the seed spread as its tolerance called that 'holds'), holds where every run is above, and
    is a tie in between; the attention claim takes a width's worst comparison."""
    cfg = ma.task_config(ma.parse_args(TINY))
    rng = np.random.default_rng()
    lo, hi = sorted(rng.uniform(0.06, 0.98, 2))
    att_low = rng.uniform(0.0, min(lo, 0.05) - 0.006)
    cells = [_cell("gsa", 8, [lo, 0.0, hi, 0.0], [2.0] * 4),
             _cell("attention", 8, [att_low, 0.0, att_low, 0.0], [6.9] * 4),
             # width 16: GSA's range overlaps attention's, GLA's lies wholly below both
             _cell("gsa", 16, [0.3, 0.0, 0.6, 0.0], [2.0] * 4),
             _cell("attention", 16, [0.5, 0.0, 0.9, 0.0], [1.0] * 4),
             _cell("gla", 16, [0.1, 0.0, 0.2, 0.0], [3.0] * 4)]
    record = ma.finish({"tag": "t", "config": cfg, "commands": ["a"], "cells": cells})
    v = {v["claim"]: v for v in record["verdicts"]}
    att = v["GSA, GLA, RetNet ≤ attention"]
    assert [(c["width"], c["outcome"], c["vs"]) for c in att["cells"]] == [
        (8, "fail", "gsa"), (16, "tie", "gsa")]
    assert att["summary"] == "does not hold (D = 8); seeds overlap at D = 16"
    assert math.isclose(att["cells"][0]["margin"], att_low - (lo + hi) / 2)
    assert [(c["width"], c["outcome"]) for c in v["GSA ≥ GLA"]["cells"]] == [(16, "win")]
    assert v["GSA ≥ GLA"]["summary"] == "holds"
    text = ma.markdown(record)
    assert "D=8: attention − GSA" in text and "(FAILS; open: " in text and "(tie; open: " in text
    # ranges closer than the separation are a tie, not a win
    near = [_cell("gsa", 8, [0.50, 0.0, 0.52, 0.0], [2.0] * 4),
            _cell("gla", 8, [0.49, 0.0, 0.497, 0.0], [2.0] * 4)]
    only = ma.finish({"tag": "t", "config": cfg, "commands": ["a"], "cells": near})
    assert {v["claim"]: v["summary"] for v in only["verdicts"]}["GSA ≥ GLA"] == (
        "not separated (seeds overlap at D = 8)")


def test_verdicts_name_the_cut_cells_that_could_still_turn_them():
    """An outcome is provisional where a cell that could still rise was cut: its model's untried
    grid lrs, or fewer than 64 epochs without every run early-stopped. Such cells are named on
    the losing side of a win or a fail and on both sides of a tie; a cell trained as the authors
    did is never named."""
    cfg = ma.task_config(ma.parse_args(TINY))
    rng = np.random.default_rng()
    full_gsa = [1e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2]

    def cell(model, lrs, accs, epochs=64):   # accs: per lr, the two seeds' accuracies
        runs = [{"lr": lr, "seed": s, "stopped_epoch": None,
                 "curve": [{"step": 1, "epoch": 1, "loss": 2.0, "accuracy": float(a)}]}
                for lr, by_seed in zip(lrs, accs) for s, a in enumerate(by_seed)]
        return {**_cell(model, 8, [0.0] * 4, [2.0] * 4), "lrs": list(lrs), "runs": runs,
                "max_epochs": 64, "epochs_done": int(epochs)}

    lo = rng.uniform(0.1, 0.4, 2)                       # GSA well below GLA: a fail
    hi = rng.uniform(0.6, 0.9, 2)
    gsa_full = cell("gsa", full_gsa, [lo] + [[0.0, 0.0]] * 5)
    gla_cut = cell("gla", [2e-3], [hi], epochs=rng.integers(10, 63))
    v = {x["claim"]: x for x in ma.finish({"tag": "t", "config": cfg, "commands": [],
                                           "cells": [gsa_full, gla_cut]})["verdicts"]}
    (c,) = v["GSA ≥ GLA"]["cells"]
    # GSA lost with its whole grid and 64 epochs: nothing open, however short GLA was
    assert (c["outcome"], c["open"]) == ("fail", [])
    # GSA cut to two lrs: its four untried grid points are open
    gsa_cut = cell("gsa", [2e-3, 5e-3], [lo, [0.0, 0.0]])
    record = ma.finish({"tag": "t", "config": cfg, "commands": [], "cells": [gsa_cut, gla_cut]})
    (c,) = {x["claim"]: x for x in record["verdicts"]}["GSA ≥ GLA"]["cells"]
    assert c["outcome"] == "fail"
    assert [(o["model"], o["untried_lrs"], o["epochs_done"]) for o in c["open"]] == [
        ("gsa", [1e-4, 5e-4, 1e-3, 1e-2], None)]
    assert "(FAILS; open: GSA 4 of 6 grid lrs untried)" in ma.markdown(record)
    # a tie names both cut sides; GLA's short epochs too
    mid = [float(hi.min()) - 0.01, float(hi.max()) + 0.01]
    record = ma.finish({"tag": "t", "config": cfg, "commands": [],
                        "cells": [cell("gsa", [2e-3, 5e-3], [mid, [0.0, 0.0]]), gla_cut]})
    (c,) = {x["claim"]: x for x in record["verdicts"]}["GSA ≥ GLA"]["cells"]
    assert c["outcome"] == "tie"
    assert [(o["model"], o["epochs_done"]) for o in c["open"]] == [
        ("gsa", None), ("gla", gla_cut["epochs_done"])]
    assert (f"GLA 3 of 4 grid lrs untried, {gla_cut['epochs_done']:g} of 64 epochs"
            in ma.markdown(record))
    # a cell whose every run early-stopped is not short, whatever its epochs
    early = {**cell("attention", [1e-4, 4.64e-4, 2.15e-3, 1e-2], [hi] * 4, epochs=12),
             "stop_reason": "all runs early-stopped"}
    assert mqar_report.open_cell(early) is None


def test_a_short_part_of_a_joined_cell_is_named_as_cut():
    """A cell trained in parts whose one part ran the authors' 64 epochs and another paused
    short of them is a short cell: its own epochs_done (the furthest part's) would hide that.
    The verdict's 'open' mark and the cut line name the short part's lr and epochs, and the
    table gives each part's epochs and stop reason."""
    rng = np.random.default_rng()
    cfg = ma.task_config(ma.parse_args(TINY))
    paused_at = int(rng.integers(10, 63))
    lo, hi = rng.uniform(0.1, 0.3, 4), rng.uniform(0.6, 0.9, 4)
    full = lambda c: {**c, "max_epochs": 64, "epochs_done": 64}   # noqa: E731
    done = full(_cell("gsa", 8, lo[[0, 2]], [2.0] * 2, lrs=(2e-3,)))
    paused = {**full(_cell("gsa", 8, lo[[1, 3]], [2.0] * 2, lrs=(1e-3,))),
              "epochs_done": paused_at, "stop_reason": "paused (resumes from --state-dir)"}
    gla = full(_cell("gla", 8, hi, [2.0] * 4, lrs=(1e-4, 4.64e-4, 2.15e-3, 1e-2)))
    rec = lambda *cells: _record(cfg, *cells)  # noqa: E731
    record = ma.finish(ma.merge(rec(done, gla), rec(paused)))
    (cell,) = [c for c in record["cells"] if c["model"] == "gsa"]
    assert cell["epochs_done"] == 64 and mqar_report.short_of_epochs(cell)
    assert [p["epochs_done"] for p in mqar_report.short_parts(cell)] == [paused_at]
    (c,) = {x["claim"]: x for x in record["verdicts"]}["GSA ≥ GLA"]["cells"]
    assert c["outcome"] == "fail"
    assert [(o["model"], o["epochs_done"], o["short_lrs"]) for o in c["open"]] == [
        ("gsa", paused_at, [1e-3])]
    text = ma.markdown(record)
    assert f"lr 0.001 at {paused_at} of 64 epochs" in text
    assert f"GSA D=8 (lr 0.001): {paused_at} epochs, paused" in text
    row = [line for line in text.splitlines() if line.startswith("| GSA | 8 |")][0]
    assert f"64 / 64 / 64 ; {paused_at} / 64 / 64" in row
    assert "max epochs ; paused (resumes from --state-dir)" in row
    # the same part finished: nothing short, nothing open for GSA
    record = ma.finish(ma.merge(rec(done, gla), rec({**paused, "epochs_done": 64,
                                                     "stop_reason": "max epochs"})))
    (cell,) = [c for c in record["cells"] if c["model"] == "gsa"]
    assert not mqar_report.short_of_epochs(cell)
    (c,) = {x["claim"]: x for x in record["verdicts"]}["GSA ≥ GLA"]["cells"]
    assert [o["epochs_done"] for o in c["open"]] == [None]


@pytest.mark.slow   # two small attention compiles (~15 s on 2 cores): CI's second step
def test_call_deadline_pauses_the_cell_and_defers_the_next(tmp_path, monkeypatch, capsys):
    """--call-seconds: when the process's deadline passes during a cell, the cell pauses after
    its current chunk and is saved (resumable), and the cells after it are not started (the
    deadline is moved into the past at the first cell's start, as a slow compile would)."""
    import time
    real_train_cell = ma.train_cell

    def train_cell_late(name, width, args, data, **kw):
        args.call_deadline = time.perf_counter()
        return real_train_cell(name, width, args, data, **kw)

    monkeypatch.setattr(ma, "train_cell", train_cell_late)
    argv = TINY + ["--models", "attention", "--widths", "8", "16", "--max-epochs", "2",
                   "--eval-every", "2", "--tag", "t", "--out-dir", str(tmp_path),
                   "--state-dir", str(tmp_path / "s"), "--call-seconds", "3600"]
    assert ma.main(argv) == 0
    assert "not started in this call: Attention D=16" in capsys.readouterr().out
    (cell,) = json.loads((tmp_path / "mqar_authors_t.json").read_text())["cells"]
    assert (cell["width"], cell["steps_done"]) == (8, 2)   # one chunk of 2 steps, of 8
    assert cell["stop_reason"].startswith("paused")
    saved, _ = ma.load_cell_state(str(tmp_path / "s" / "attention_D8"))
    assert saved["step"] == 2
    assert ma.load_cell_state(str(tmp_path / "s" / "attention_D16")) is None
    with pytest.raises(SystemExit):   # a deadline without a state to pause into
        ma.parse_args(TINY + ["--call-seconds", "60"])


def _script_tree(tmp_path):
    """(the repo, a copy of its experiments/ as the device's tree at tmp_path/tree, the
    mqar_authors.py options of a tiny cell) for the device-call scripts' tests."""
    import shutil
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    work = tmp_path / "tree"
    shutil.copytree(os.path.join(repo, "experiments"), work / "experiments",
                    ignore=shutil.ignore_patterns("results", "__pycache__"))
    tiny = ("--max-epochs 2 --train-examples 256 --test-examples 32 --seq-len 32 "
            "--kv-pairs 4 --vocab-size 64 --batch-size 32 --eval-every 4")
    return repo, work, tiny


@pytest.mark.slow
def test_device_call_script_pauses_and_resumes_a_cell(tmp_path):
    """experiments/mqar_device_call.sh (one device call of a cell, state kept in devstate/)
    at a tiny size on the CPU: the first call pauses the cell after its first chunk
    (--pause-seconds 0 through MQAR_EXTRA, which overrides the script's options) with its
    state saved and returned in parts; a second call in the same tree resumes and finishes
    it; each call returns the report, the logs and (small here) the state."""
    import subprocess
    import tarfile

    repo, work, tiny = _script_tree(tmp_path)
    tiny += " --widths 16"
    reports = []
    for call, extra in enumerate((" --pause-seconds 0 --state-part-mb 0.2", "")):
        out = tmp_path / f"out{call}"
        env = {**os.environ, "OUT": str(out), "MQAR_EXTRA": tiny + extra,
               "PYTHONPATH": os.pathsep.join([str(work), repo])}
        if call == 1:   # between sessions: the state out in pieces, the machine fresh, back in
            _state_round_trip(work, tmp_path, env)
        subprocess.run(["bash", "experiments/mqar_device_call.sh", "retnet", "16", "600",
                        "calltest"], cwd=work, env=env, check=True, timeout=900)
        with tarfile.open(out / "logs.tgz") as logs:
            assert "logs/mqar_retnet_D16.txt" in logs.getnames()
        reports.append(json.loads((out / "mqar_authors_calltest.json").read_text()))
        assert list(out.glob("st.part*")), call   # saved when paused and when done
    first, second = ([c for c in r["cells"] if c["model"] == "retnet"][0] for r in reports)
    assert first["stop_reason"].startswith("paused") and first["steps_done"] < 16
    assert second["stop_reason"] == "max epochs" and second["steps_done"] == 16
    assert (first["calls"], second["calls"]) == (1, 2)   # resumed from devstate/, not redone


def _state_round_trip(work, tmp_path, env):
    """experiments/mqar_state_transfer.sh on the paused cell's state in work/devstate: `get`
    in windows of 2 parts (as several device calls would return them), `verify` of the
    gathered parts (and its refusal of a damaged copy), the machine's state removed, then
    `stage` + `put` per window (the put waits, exit 3, until every part is there; a damaged
    upload is refused, exit 4, and installs nothing); the installed parts are the original
    bytes."""
    import hashlib
    import shutil
    import subprocess

    def transfer(*args, out=None, check=True):
        run_env = {**env, "OUT": str(out or tmp_path / "unused")}
        return subprocess.run(["bash", "experiments/mqar_state_transfer.sh", *map(str, args)],
                              cwd=work, env=run_env, check=check, timeout=60,
                              capture_output=True, text=True)

    state = work / "devstate" / "mqstate"
    digest = lambda d: {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in sorted(d.glob("retnet_D16.state.*"))}
    original = digest(state)
    assert len(original) >= 3, original   # several parts, so that the windows matter
    got = tmp_path / "got"
    got.mkdir()
    for first in range(0, len(original), 2):
        out = tmp_path / f"get{first}"
        transfer("get", "retnet", 16, first, 2, out=out)
        for f in out.iterdir():
            shutil.copy(f, got / f.name)
        if first + 2 < len(original):   # not all there yet: verify refuses
            assert transfer("verify", got, "retnet", 16, check=False).returncode == 4
    transfer("verify", got, "retnet", 16)
    damaged = tmp_path / "damaged"
    shutil.copytree(got, damaged)
    part = damaged / "retnet_D16.state.001"
    part.write_bytes(b"x" + part.read_bytes()[1:])
    assert transfer("verify", damaged, "retnet", 16, check=False).returncode == 4

    shutil.rmtree(state)
    transfer("stage", damaged, "retnet", 16, 0, len(original))
    assert transfer("put", "retnet", 16, check=False).returncode == 4
    assert not digest(state)
    windows = list(range(0, len(original), 2))
    for first in windows:
        transfer("stage", got, "retnet", 16, first, 2)
        done = transfer("put", "retnet", 16, check=False)
        assert done.returncode == (0 if first == windows[-1] else 3), done.stdout + done.stderr
    assert digest(state) == original


@pytest.mark.slow   # three tiny cells, two at a time (~60 s on 2 cores)
def test_device_cells_script_trains_cells_side_by_side(tmp_path):
    """experiments/mqar_device_cells.sh on the CPU with MQAR_GPUS=2: three cells, two queues
    (the first 'GPU' trains two cells one after another); the call's report merges every cell
    trained under the tag, each cell's state is saved for the next call, and a call with too
    little time left starts no cell, says so, and still returns the report so far."""
    import subprocess
    import tarfile

    repo, work, tiny = _script_tree(tmp_path)
    env = {**os.environ, "MQAR_EXTRA": tiny, "MQAR_GPUS": "2",
           "PYTHONPATH": os.pathsep.join([str(work), repo])}
    cells = ["attention:8", "retnet:16", "attention:16"]

    def call(seconds, out):
        subprocess.run(["bash", "experiments/mqar_device_cells.sh", str(seconds), "cells",
                        *cells], cwd=work, env={**env, "OUT": str(out)}, check=True,
                       timeout=900)
        report = json.loads((out / "mqar_authors_cells.json").read_text())
        with tarfile.open(out / "cells.tgz") as tgz:
            names = set(tgz.getnames())
            left = (tgz.extractfile("left.txt").read().decode() if "left.txt" in names
                    else "")
        return report, names, left

    report, names, left = call(600, tmp_path / "out1")
    assert sorted((c["model"], c["width"], c["stop_reason"]) for c in report["cells"]) == [
        ("attention", 8, "max epochs"), ("attention", 16, "max epochs"),
        ("retnet", 16, "max epochs")]
    for cell in ("attention_D8", "retnet_D16", "attention_D16"):
        m, w = cell.split("_D")
        assert f"{cell}/logs/mqar_{m}_D{w}.txt" in names
        assert list((work / "devstate" / "mqstate").glob(f"{cell}.state.*")), cell
    assert left == ""
    report, names, left = call(100, tmp_path / "out2")   # 100 s: under 120 s left per cell
    # (the two queues write their lines in either order)
    assert sorted(line.split(" ")[0] for line in left.splitlines()) == sorted(cells)
    assert len(report["cells"]) == 3


@pytest.mark.slow   # two tiny lr parts of one cell, one after another (~40 s on 2 cores)
def test_device_cells_script_queues_lr_parts_of_one_cell(tmp_path):
    """experiments/mqar_device_cells.sh with MODEL:WIDTH:LR and MODEL:WIDTH:LR:sSEED cells on one
    'GPU': an lr part and the two seed parts of another lr train one after another, each with
    its own state (a shared one would make the next part refuse the last's), and the call's
    report joins them into one cell of both lrs and both seeds, equal to the parts' runs; a
    chained call resumes the finished parts (their states are kept) and trains nothing again;
    a malformed cell stops the call before any training."""
    import subprocess
    import tarfile

    repo, work, tiny = _script_tree(tmp_path)
    env = {**os.environ, "MQAR_EXTRA": tiny + " --widths 8", "MQAR_GPUS": "1",
           "PYTHONPATH": os.pathsep.join([str(work), repo])}
    cells = ["attention:8:3e-3", "attention:8:2e-2:s0", "attention:8:2e-2:s1"]

    def call(out, *cells):
        return subprocess.run(["bash", "experiments/mqar_device_cells.sh", "600", "parts",
                               *cells], cwd=work, env={**env, "OUT": str(out)}, timeout=900,
                              capture_output=True, text=True)

    assert call(tmp_path / "out1", *cells).returncode == 0
    report = json.loads((tmp_path / "out1" / "mqar_authors_parts.json").read_text())
    (cell,) = report["cells"]
    assert sorted(cell["lrs"]) == [3e-3, 2e-2]
    assert sorted((p["lrs"], p["seed_ids"]) for p in cell["parts"]) == [
        ([3e-3], [0, 1]), ([2e-2], [0]), ([2e-2], [1])]
    assert sorted((r["lr"], r["seed"]) for r in cell["runs"]) == [
        (3e-3, 0), (3e-3, 1), (2e-2, 0), (2e-2, 1)]
    assert cell["seeds"] == 2 and "0.02 (seed 1)" in (tmp_path / "out1" /
                                                       "mqar_authors_parts.md").read_text()
    for part_name, lr, seeds in (("lr3e-3", 3e-3, [0, 1]), ("lr2e-2_s0", 2e-2, [0]),
                                 ("lr2e-2_s1", 2e-2, [1])):
        part_report = json.loads((work / "devstate" / "cells" / f"attention_D8_{part_name}" / "o"
                                  / "mqar_authors_parts.json").read_text())
        (part,) = part_report["cells"]
        assert [r["seed"] for r in part["runs"]] == seeds
        assert [r["curve"] for r in part["runs"]] == [
            r["curve"] for r in cell["runs"] if r["lr"] == lr and r["seed"] in seeds]
        assert list((work / "devstate" / "mqstate" / part_name).glob("attention_D8.state.*"))
    with tarfile.open(tmp_path / "out1" / "cells.tgz") as tgz:
        assert {"attention_D8_lr3e-3/logs/mqar_attention_D8.txt",
                "attention_D8_lr2e-2_s1/logs/mqar_attention_D8.txt"} <= set(tgz.getnames())

    assert call(tmp_path / "out2", *cells).returncode == 0   # both parts already finished
    again = json.loads((tmp_path / "out2" / "mqar_authors_parts.json").read_text())
    (cell2,) = again["cells"]
    assert [r["curve"] for r in cell2["runs"]] == [r["curve"] for r in cell["runs"]]
    assert cell2["steps_done"] == cell["steps_done"]
    # resumed from each part's own state (a retrain from scratch would give the same curves)
    assert [p["calls"] for p in cell2["parts"]] == [2, 2, 2]

    for malformed in ("attention:8:fast", "attention:8:s1", "attention:8:2e-2:1"):
        bad = call(tmp_path / "out3", malformed)
        assert bad.returncode == 2 and "MODEL:WIDTH:LR" in bad.stderr


@pytest.mark.slow   # one tiny lr part, paused, then resumed on a fresh tree (~40 s on 2 cores)
def test_device_cells_script_returns_a_paused_parts_state(tmp_path):
    """A part that pauses in a mqar_device_cells.sh call comes back as st.part* (one tar of its
    state files, paths under devstate/), and left.txt says so; unpacked into a fresh tree's
    devstate/ (the next session's machine) the part resumes there (calls 2) and finishes, its
    curve continuing the paused one's; a part that finished returns no state."""
    import subprocess
    import tarfile

    repo, work, tiny = _script_tree(tmp_path / "a")
    _, fresh, _ = _script_tree(tmp_path / "b")
    tiny += " --widths 16"
    cells = ["retnet:16:3e-3"]

    def call(tree, out, extra=""):
        env = {**os.environ, "MQAR_EXTRA": tiny + extra, "MQAR_GPUS": "1", "OUT": str(out),
               "PYTHONPATH": os.pathsep.join([str(tree), repo])}
        subprocess.run(["bash", "experiments/mqar_device_cells.sh", "600", "ret", *cells],
                       cwd=tree, env=env, check=True, timeout=900)
        (cell,) = json.loads((out / "mqar_authors_ret.json").read_text())["cells"]
        with tarfile.open(out / "cells.tgz") as tgz:
            names = set(tgz.getnames())
            left = (tgz.extractfile("left.txt").read().decode() if "left.txt" in names
                    else "")
        return cell, sorted(out.glob("st.part*")), left

    first, parts, left = call(work, tmp_path / "out1", " --pause-seconds 0 --state-part-mb 0.2")
    assert first["stop_reason"].startswith("paused") and first["steps_done"] < 16
    assert parts and "paused states returned" in left and "lr3e-3/retnet_D16.state" in left
    saved = sorted((work / "devstate" / "mqstate" / "lr3e-3").glob("retnet_D16.state.*"))
    (fresh / "devstate").mkdir()
    subprocess.run(f"cat {' '.join(map(str, parts))} | tar xf - -C devstate", shell=True,
                   cwd=fresh, check=True)
    unpacked = sorted((fresh / "devstate" / "mqstate" / "lr3e-3").glob("retnet_D16.state.*"))
    assert [p.name for p in unpacked] == [p.name for p in saved]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(unpacked, saved))

    second, parts2, left2 = call(fresh, tmp_path / "out2")
    assert second["stop_reason"] == "max epochs" and second["calls"] == 2
    for r1, r2 in zip(first["runs"], second["runs"]):
        assert r2["curve"][:len(r1["curve"])] == r1["curve"]
        assert len(r2["curve"]) > len(r1["curve"])
    assert parts2 == [] and "paused states" not in left2

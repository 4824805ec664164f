"""experiments/scaling.py: the pure parts (layouts of N devices, the runs of a sweep, scaling
efficiency, loss-curve comparison, the derived report numbers, merging) against values written
out by hand or recomputed here with NumPy; the overrides of a run load as the config they mean;
and (slow) the --smoke run end to end on simulated CPU devices."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from script_util import ROOT, load_experiment

scaling = load_experiment("scaling")


def test_layout_meshes():
    assert scaling.layout_mesh("single", 1) == (1, 1, 1)
    assert scaling.layout_mesh("single", 2) is None
    assert scaling.layout_mesh("dp", 1) is None
    assert scaling.layout_mesh("dp", 4) == (4, 1, 1)
    assert scaling.layout_mesh("fsdp", 8) == (1, 8, 1)
    assert scaling.layout_mesh("fsdp_tp", 2) == (1, 1, 2)
    assert scaling.layout_mesh("fsdp_tp", 8) == (1, 4, 2)
    assert scaling.layout_mesh("fsdp_tp", 3) is None
    with pytest.raises(ValueError, match="unknown layout"):
        scaling.layout_mesh("pipeline", 4)
    for n in (2, 4, 8):  # every mesh uses exactly the N devices
        for layout in ("dp", "fsdp", "fsdp_tp"):
            assert math.prod(scaling.layout_mesh(layout, n)) == n


def test_sweep_runs_filter_by_device_count():
    runs = scaling.sweep_runs(["a", "b"], [1, 2, 4, 8], device_count=4)
    got = [(r["kind"], r["config"], r["layout"], r["n"], r["accum"]) for r in runs]
    expected = []
    for c in ("a", "b"):  # the 1-GPU runs first (side by side under --jobs), then by N
        expected += [("sweep", c, "single", 1, 1), ("ref", c, "single", 1, 2),
                     ("ref", c, "single", 1, 4)]
        for n in (2, 4):
            expected += [("sweep", c, layout, n, 1) for layout in ("dp", "fsdp", "fsdp_tp")]
    assert got == expected
    assert all(r["mesh"] == scaling.layout_mesh(r["layout"], r["n"]) for r in runs)
    # a subset of layouts, no references, one device only
    runs = scaling.sweep_runs(["a"], [1, 2], device_count=1, layouts=["fsdp"], reference=False)
    assert runs == []
    runs = scaling.sweep_runs(["a"], [2, 2, 1], device_count=8, layouts=["single", "fsdp"],
                              reference=False)
    assert [(r["layout"], r["n"]) for r in runs] == [("single", 1), ("fsdp", 2)]


def test_max_loss_diff_against_numpy():
    rng = np.random.default_rng(0)
    steps = np.arange(1, 51)
    a = rng.normal(5, 1, 50)
    b = a + rng.normal(0, 0.01, 50)
    curve_a = [[int(s), float(x)] for s, x in zip(steps, a)]
    curve_b = [[int(s), float(x)] for s, x in zip(steps, b)]
    assert scaling.max_loss_diff(curve_a, curve_b) == pytest.approx(np.max(np.abs(a - b)))
    # only the common steps count (a resumed run's tail against a whole curve)
    tail = curve_a[30:]
    assert scaling.max_loss_diff(tail, curve_b) == pytest.approx(np.max(np.abs(a[30:] - b[30:])))
    assert scaling.max_loss_diff(curve_a, []) is None
    assert scaling.max_loss_diff([[1, float("nan")]], [[1, 2.0]]) == math.inf
    assert scaling.max_loss_diff([[1, None]], [[1, 2.0]]) == math.inf


def test_scaling_efficiency():
    assert scaling.scaling_efficiency(360.0, 4, 100.0) == pytest.approx(0.9)
    assert scaling.scaling_efficiency(100.0, 1, 100.0) == 1.0
    assert scaling.scaling_efficiency(None, 2, 100.0) is None
    assert scaling.scaling_efficiency(100.0, 2, None) is None


def _row(kind, layout, n, accum=1, tps=None, curve=(), status="ok", config="m", **extra):
    return dict(kind=kind, config=config, layout=layout, n=n, accum=accum, status=status,
                tokens_per_s=tps, loss_curve=[list(p) for p in curve],
                mesh=list(scaling.layout_mesh(layout, n) or (1, 1, 1)), **extra)


def test_analyse_derives_efficiency_and_loss_differences():
    rng = np.random.default_rng(1)
    base = rng.normal(4, 0.5, 10)
    curve = lambda x: [(i + 1, float(v)) for i, v in enumerate(x)]  # noqa: E731
    noise = {layout: rng.normal(0, 0.02, 10) for layout in ("dp", "fsdp", "fsdp_tp")}
    ref_curve = base + rng.normal(0, 0.02, 10)
    rows = [_row("sweep", "single", 1, tps=1000.0, curve=curve(rng.normal(4, 0.5, 10))),
            _row("ref", "single", 1, accum=4, tps=250.0, curve=curve(ref_curve)),
            _row("sweep", "dp", 4, tps=3700.0, curve=curve(base + noise["dp"])),
            _row("sweep", "fsdp", 4, tps=3400.0, curve=curve(base + noise["fsdp"])),
            _row("sweep", "fsdp_tp", 4, status="oom", curve=())]
    # a resumed run: steps 6..10 under fsdp_tp... which failed, and one under dp from fsdp
    resumed = base[5:] + rng.normal(0, 0.01, 5)
    rows.append(_row("resume", "dp", 4, curve=[(i + 6, float(v)) for i, v in enumerate(resumed)],
                     phase="resumed", resume_from="fsdp", resume_at=5))
    out = scaling.analyse(rows, loss_tol=0.05)
    eff = {(s["layout"], s["n"]): s["efficiency"] for s in out["scaling"]}
    assert eff[("single", 1)] == pytest.approx(1.0)
    assert eff[("dp", 4)] == pytest.approx(3700 / 4000)
    assert eff[("fsdp", 4)] == pytest.approx(3400 / 4000)
    assert eff[("fsdp_tp", 4)] is None
    loss = {s["layout"]: s for s in out["loss"]}
    for layout in ("dp", "fsdp"):
        want = np.max(np.abs(base + noise[layout] - ref_curve))
        assert loss[layout]["max_abs_diff"] == pytest.approx(want)
        assert loss[layout]["within_tol"] == (want <= 0.05)
    assert loss["fsdp_tp"]["max_abs_diff"] is None and loss["fsdp_tp"]["within_tol"] is None
    between = np.max(np.abs(noise["dp"] - noise["fsdp"]))  # dp against fsdp, same global batch
    assert loss["dp"]["vs_layouts"] == pytest.approx(between)
    assert loss["fsdp"]["vs_layouts"] == pytest.approx(between)
    assert loss["fsdp_tp"]["vs_layouts"] is None
    (res,) = out["resume"]
    assert res["vs_to"] == pytest.approx(np.max(np.abs(resumed - (base + noise["dp"])[5:])))
    assert res["vs_from"] == pytest.approx(np.max(np.abs(resumed - (base + noise["fsdp"])[5:])))
    assert (res["from"], res["to"], res["at"]) == ("fsdp", "dp", 5)


def test_merge_replaces_runs_made_again():
    old = [_row("sweep", "single", 1, tps=1.0), _row("sweep", "dp", 2, tps=2.0),
           _row("ref", "single", 1, accum=2, tps=3.0)]
    new = [_row("sweep", "dp", 2, tps=5.0), _row("sweep", "fsdp", 2, tps=6.0)]
    merged = scaling.merge_rows(old, new)
    assert [(r["layout"], r["accum"], r["tokens_per_s"]) for r in merged] == [
        ("single", 1, 1.0), ("single", 2, 3.0), ("dp", 1, 5.0), ("fsdp", 1, 6.0)]


def test_only_missing_leaves_out_runs_made():
    args = scaling.parse_args(["--configs", "configs/tiny.yaml", "--gpus", "1", "2",
                               "--resume-check", "--merge", "--only-missing", "--tag", "t"])
    runs = scaling.planned_runs(args, device_count=2)
    previous = [_row("sweep", "single", 1, config="tiny"),
                _row("sweep", "dp", 2, config="tiny", status="timeout"),
                _row("ref", "single", 1, accum=2, config="tiny"),
                _row("resume", "fsdp", 2, config="tiny", phase="interrupted")]
    left = scaling.missing_runs(runs, previous)
    assert [(r["kind"], r["layout"], r["n"], r.get("phase")) for r in left] == [
        ("sweep", "dp", 2, None), ("sweep", "fsdp", 2, None), ("sweep", "fsdp_tp", 2, None),
        ("resume", "fsdp", 2, "interrupted"), ("resume", "fsdp_tp", 2, "resumed")]
    assert left[4]["after"] == 3  # still after its interrupted phase, in the kept list
    previous.append(_row("resume", "fsdp_tp", 2, config="tiny", phase="resumed"))
    left = scaling.missing_runs(runs, previous)
    assert [r["kind"] for r in left] == ["sweep"] * 3  # a resume that resumed fine is kept


def test_device_pool_gives_disjoint_devices_in_order():
    import threading
    import time
    pool = scaling.DevicePool(["0", "1", "2", "3"])
    held, log, lock = set(), [], threading.Lock()

    def job(i, n):
        ids = pool.acquire(n)
        with lock:
            assert not held & set(ids)  # never a device two runs hold at once
            held.update(ids)
            log.append(i)
        time.sleep(0.02)
        with lock:
            held.difference_update(ids)
        pool.release(ids)

    sizes = [1, 1, 4, 1, 2, 2, 1]
    threads = []
    for i, n in enumerate(sizes):  # started in order: tickets are taken in this order
        threads.append(threading.Thread(target=job, args=(i, n)))
        threads[-1].start()
        while pool.next_ticket <= i:  # its ticket taken before the next thread starts
            time.sleep(0.001)
    for t in threads:
        t.join(10)
    assert log == list(range(len(sizes)))  # strictly first come, first served
    assert sorted(pool.free) == ["0", "1", "2", "3"]
    with pytest.raises(ValueError):
        pool.acquire(5)


def test_profile_window_argument():
    assert scaling.parse_steps_window("10:12") == [10, 12]
    assert scaling.parse_steps_window("7") == [7, 7]
    for bad in ("0:3", "5:2", "a:b"):
        with pytest.raises(Exception):
            scaling.parse_steps_window(bad)


def test_run_overrides_load_as_the_run_they_mean(tmp_path):
    from gsa_jax.config import load_config
    args = scaling.parse_args(["--per-gpu-batch", "8", "--seq-len", "1024", "--steps", "50",
                               "--set", "model.impl=pallas", "--profile-steps", "20:22"])
    run = dict(kind="sweep", config="gsa-1.3b", layout="fsdp_tp", n=4,
               mesh=scaling.layout_mesh("fsdp_tp", 4), accum=1, steps=50, stop_at=50)
    path = scaling.config_path("gsa-1.3b")
    cfg = load_config(path, scaling.run_overrides(args, run, str(tmp_path / "r")))
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (1, 2, 2)
    assert (cfg.data.batch_size, cfg.data.seq_len, cfg.optim.grad_accum) == (32, 1024, 1)
    assert cfg.data.source == "stdlib" and cfg.data.bos_id is None  # no token files needed
    assert cfg.steps == 51 and cfg.optim.warmup_steps == 10  # no final save at step 50
    assert cfg.model.impl == "pallas" and cfg.model.num_layers == 24
    assert cfg.logging.every == 1 and cfg.logging.profile_steps == [20, 22]
    assert cfg.eval.every == 0 and cfg.sample.max_new_tokens == 0
    # the same-global-batch reference of N = 4: one device, 4 micro-batches of 8
    ref = dict(run, kind="ref", layout="single", n=1, mesh=(1, 1, 1), accum=4)
    cfg = load_config(path, scaling.run_overrides(args, ref, str(tmp_path / "r")))
    assert (cfg.data.batch_size, cfg.optim.grad_accum) == (32, 4)
    assert cfg.logging.profile_steps is None  # profiles are of the sweep runs only


def test_planned_resume_and_fit_runs():
    args = scaling.parse_args(["--configs", "gsa-340m", "--steps", "20", "--resume-check",
                               "--fit-check", "configs/gsa-2.7b.yaml", "--no-sweep"])
    runs = scaling.planned_runs(args, device_count=4)
    first, second, single, fsdp = runs
    assert (first["layout"], first["mesh"], first["stop_at"], first["checkpoint_every"]) == (
        "fsdp", (1, 4, 1), 11, 10)
    assert (second["layout"], second["mesh"], second["stop_at"]) == ("fsdp_tp", (1, 2, 2), 20)
    assert second["run_dir"] == first["run_dir"] and second["fresh"] is False
    assert second["after"] == 0 and first.get("after") is None  # resumed after it stopped
    assert (single["n"], single["global_batch"], fsdp["n"], fsdp["mesh"]) == (1, 128, 4,
                                                                               (1, 4, 1))
    args = scaling.parse_args(["--fit-check", "gsa-2.7b", "--no-sweep", "--fit-layouts",
                               "single", "dp", "fsdp", "--fit-batch", "64"])
    runs = scaling.planned_runs(args, device_count=2)
    assert [(r["layout"], r["n"], r["mesh"], r["global_batch"]) for r in runs] == [
        ("single", 1, (1, 1, 1), 64), ("dp", 2, (2, 1, 1), 64), ("fsdp", 2, (1, 2, 1), 64)]


@pytest.mark.slow  # 3.6 min on a loaded 2-core CPU: ten runs, each its own process
def test_smoke_run(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--smoke", "--tag", "test", "--out-dir", str(out), "--work-dir", str(work),
            "--resume-check", "--fit-check", "configs/tiny.yaml", "--jobs", "2"]
    assert scaling.main(argv) == 0
    record = json.loads((out / "scaling_test.json").read_text())
    rows = record["rows"]
    assert all(r["status"] == "ok" for r in rows), [r.get("reason") for r in rows]
    kinds = sorted((r["kind"], r["layout"], r["n"], r["accum"], r.get("phase")) for r in rows)
    assert kinds == sorted([
        ("sweep", "single", 1, 1, None), ("sweep", "dp", 2, 1, None),
        ("sweep", "fsdp", 2, 1, None), ("sweep", "fsdp_tp", 2, 1, None),
        ("ref", "single", 1, 2, None), ("resume", "fsdp", 2, 1, "interrupted"),
        ("resume", "fsdp_tp", 2, 1, "resumed"), ("fit", "single", 1, 1, None),
        ("fit", "fsdp", 2, 1, None)])
    for r in rows:
        if r["kind"] in ("sweep", "ref"):
            assert [s for s, _ in r["loss_curve"]] == list(range(1, 7))
            assert r["tokens_per_s"] > 0 and r["global_batch"] == 2 * r["n"] * r["accum"]
    # float32 on a CPU: the layouts agree to rounding, far inside the bf16 tolerance
    for item in record["derived"]["loss"]:
        assert item["max_abs_diff"] < 1e-3 and item["within_tol"], item
        assert item["vs_layouts"] < 1e-3
    (res,) = record["derived"]["resume"]
    assert res["vs_to"] < 1e-3 and res["vs_from"] < 1e-3
    # --jobs 2: the two 1-GPU runs (single, ref) went side by side, on devices 0 and 1
    single = next(r for r in rows if r["kind"] == "sweep" and r["n"] == 1)
    ref = next(r for r in rows if r["kind"] == "ref")
    assert sorted(single["devices"] + ref["devices"]) == ["0", "1"]
    resumed = next(r for r in rows if r.get("phase") == "resumed")
    assert [s for s, _ in resumed["loss_curve"]] == [4, 5, 6]  # after the checkpoint of 3
    md = (out / "scaling_test.md").read_text()
    assert "| tiny | fsdp_tp | 2 | 1x1x2 |" in md and "Machine:" in md
    assert "## Resume under another layout" in md and "## Fit check" in md
    # --merge: a run made again replaces its row, the others stay
    assert scaling.main(["--smoke", "--tag", "test", "--out-dir", str(out), "--work-dir",
                         str(work), "--layouts", "single", "--no-reference", "--merge"]) == 0
    merged = json.loads((out / "scaling_test.json").read_text())
    assert len(merged["rows"]) == len(rows) and len(merged["commands"]) == 2
    # --only-missing: every run of the first command has an ok row, so nothing runs
    assert scaling.main(argv[:-2] + ["--merge", "--only-missing"]) == 0
    assert json.loads((out / "scaling_test.json").read_text()) == merged

"""The demo (the README's main job) and experiments/bench_ops.py, at tiny sizes: they run, the
demo's agreement check holds, and the benchmark writes complete records and skips what the
memory limit rules out."""

from __future__ import annotations

import json

import jax.numpy as jnp
import pytest

from gsa_jax import demo
from script_util import load_experiment

def _bench_ops():
    return load_experiment("bench_ops")


def _our_output(bench, inputs, segment_ids, dtype_name):
    """Our Pallas output on a fake peer's inputs (float64 NumPy), as bench_peer returns o."""
    import numpy as np
    return np.asarray(bench.jax.jit(bench.gsa_fn("pallas", segment_ids))(*[
        x.astype(dtype_name) for x in inputs]), np.float64)


@pytest.mark.slow  # ~9 s; the forms agree in tests/test_ops_forms.py too
def test_demo_forms_agree(capsys):
    status = demo.main(["--batch", "1", "--seq-len", "24", "--heads", "2", "--head-dim", "4",
                        "--slots", "3", "--chunk-size", "8", "--repeats", "1"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "forms agree: yes" in out
    for form in ("recurrent", "parallel", "chunk"):
        assert f"| {form} |" in out


@pytest.mark.slow  # over 30 s on a 2-core CPU: CI's second step
def test_bench_ops_writes_records(tmp_path):
    bench = _bench_ops()
    common = ["--in-process", "--tag", "test", "--out-dir", str(tmp_path), "--tokens", "64",
              "--heads", "1", "--head-dim", "4", "--slots", "2", "--warmup", "1"]
    argv = common + ["--seq-lens", "16", "32", "--forms", "parallel", "chunk", "--repeats", "2"]
    assert bench.main(argv) == 0
    report = json.loads((tmp_path / "bench_ops_test.json").read_text())
    assert report["command"].endswith(" ".join(argv))
    assert {"backend", "device_kind", "jax", "jaxlib", "python"} <= set(report["machine"])
    assert [(r["T"], r["B"], r["form"]) for r in report["rows"]] == [
        (16, 4, "parallel"), (16, 4, "chunk"), (32, 2, "parallel"), (32, 2, "chunk")]
    for row in report["rows"]:
        for mode in ("fwd", "fwd_bwd"):
            assert row[mode]["status"] == "ok", row
            assert 0 < row[mode]["min_ms"] <= row[mode]["median_ms"]
    table = (tmp_path / "bench_ops_test.md").read_text()
    assert table.count("| parallel |") == 2 and table.count("| chunk |") == 2

    # --merge re-runs one (form, T) and keeps the other rows of the same tag.
    rerun = common + ["--seq-lens", "16", "--forms", "chunk", "--repeats", "1", "--merge"]
    assert bench.main(rerun) == 0
    merged = json.loads((tmp_path / "bench_ops_test.json").read_text())
    assert len(merged["commands"]) == 2
    assert [(r["T"], r["form"]) for r in merged["rows"]] == [
        (16, "parallel"), (16, "chunk"), (32, "parallel"), (32, "chunk")]
    assert merged["rows"][2] == report["rows"][2]  # kept as it was


def test_bench_ops_skips_parallel_over_the_limit():
    """[B, H, T, T, M] f32 at B = 2, H = 1, T = 32, M = 2 is 16 KiB: a 12 KiB limit skips it
    before compiling, and says why."""
    bench = _bench_ops()
    args = bench.parse_args(["--tokens", "64", "--heads", "1", "--head-dim", "4", "--slots",
                             "2", "--mem-limit-gb", str(12 * 1024 / 2 ** 30)])
    row = bench.run_one(args, "parallel", 32)
    assert row["parallel_decay_bytes"] == 2 * 1 * 32 * 32 * 2 * 4
    for mode in ("fwd", "fwd_bwd"):
        assert row[mode]["status"] == "skipped"
        assert "materialises [B,H,T,T,M]" in row[mode]["reason"]


def test_bench_kernels_times_the_chunk_form_alone(tmp_path):
    """--impls chunk at the smoke shape (CPU): one chunk row with its times and compiled memory,
    and no other row."""
    bench = load_experiment("bench_kernels")
    argv = ["--smoke", "--impls", "chunk", "--no-check", "--no-decode", "--tag", "test",
            "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    report = json.loads((tmp_path / "bench_kernels_test.json").read_text())
    assert report["command"].endswith(" ".join(argv))
    (row,) = report["rows"]
    assert list(row["results"]) == ["chunk"]
    chunk = row["results"]["chunk"]
    assert chunk["fwd_ms"] > 0 and chunk["fwd_bwd_ms"] > 0 and chunk["mem_bytes"] > 0
    assert "| chunk |" in (tmp_path / "bench_kernels_test.md").read_text()


@pytest.mark.slow  # the kernels interpreted and timed, 3 rows: CI's second step
def test_bench_kernels_variant_rows_are_checked_against_the_default():
    """A launch variant (here the split forward in two walks or one, `split_fixup`, and the
    split walks with their combine in the kernels, on big chunks of two chunks) is timed as its
    own row and its output and gradients compared with the default pallas row's: the same
    result to float32 rounding."""
    import jax.numpy as jnp
    bench = load_experiment("bench_kernels")
    split = {"split_below_programs": 10 ** 6, "split_programs": 10 ** 6, "split_min_chunks": 2,
             "fused_max_chunks": 2}   # 4 chunks in 2 big chunks
    row = bench.bench_shape((1, 256, 2, 16, 16), jnp.float32, None, impls=("pallas",),
                            tunings={"pallas two_walks": split,
                                     "pallas fixup": {**split, "split_fixup": True},
                                     "pallas in_kernel": {**split,
                                                          "split_combine_in_kernel": True}})
    res = row["results"]
    variants = ["pallas two_walks", "pallas fixup", "pallas in_kernel"]
    assert list(res) == ["pallas"] + variants
    assert "rel_err_o_vs_pallas" not in res["pallas"]
    for name in variants:
        assert res[name]["fwd_ms"] > 0 and 0 <= res[name]["rel_err_o_vs_pallas"] < 1e-5
        assert 0 <= res[name]["rel_err_grads_vs_pallas"] < 1e-5
    page = load_experiment("bench_kernels_report").markdown(
        {"tag": "test", "device": "cpu", "jax": "x", "date": "x", "command": "x",
         "copy_bandwidth_GBps": 1.0, "checks": [], "rows": [row]})
    r = res["pallas in_kernel"]
    assert (f"| pallas in_kernel | {r['rel_err_o_vs_pallas']:.1e} | "
            f"{r['rel_err_grads_vs_pallas']:.1e} | - |") in page


def test_bench_kernels_writes_our_rows_before_the_peer_runs(tmp_path, monkeypatch):
    """The peer (its autotuning can outlast a device call) runs after every shape's JAX rows
    are on disk; its row then joins the shape's, checked against our output. The peer is
    faked here (no CUDA): it reads the results file when called and returns our own output
    perturbed by 1e-3."""
    bench = load_experiment("bench_kernels")
    seen = []

    def fake_peer(inputs, segment_ids, dtype_name):
        seen.append(json.loads((tmp_path / "bench_kernels_test.json").read_text()))
        o = _our_output(bench, inputs, segment_ids, dtype_name)
        return {"fwd_ms": 1.0, "fwd_bwd_ms": 2.0, "mem_bytes": 3}, o * (1 + 1e-3)

    monkeypatch.setattr(bench, "peer_available", lambda: True)
    monkeypatch.setattr(bench, "bench_peer", fake_peer)
    argv = ["--smoke", "--impls", "pallas", "peer", "--no-check", "--no-decode", "--tag",
            "test", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    (before,) = seen
    assert [list(r["results"]) for r in before["rows"]] == [["pallas"]]
    (row,) = json.loads((tmp_path / "bench_kernels_test.json").read_text())["rows"]
    assert list(row["results"]) == ["pallas", "peer"]
    assert abs(row["results"]["peer"]["rel_err_o_vs_pallas"] - 1e-3) < 1e-4
    # --merge at the same shape: the chunk row joins, the rows this call did not time stay
    assert bench.main(["--smoke", "--impls", "chunk", "--no-check", "--no-decode", "--merge",
                       "--tag", "test", "--out", str(tmp_path)]) == 0
    (merged,) = json.loads((tmp_path / "bench_kernels_test.json").read_text())["rows"]
    assert merged["results"]["peer"] == row["results"]["peer"]
    assert sorted(merged["results"]) == ["chunk", "pallas", "peer"]


def test_bench_kernels_keeps_the_rows_timed_before_a_cut(tmp_path, monkeypatch):
    """A call killed mid-shape (a device call's time limit) keeps the rows it timed: the
    results file is rewritten after every row, not after every shape. The cut is faked as a
    KeyboardInterrupt from the chunk row's memory reading (its last step, after pallas's row)."""
    bench = load_experiment("bench_kernels")
    real_compiled_bytes, calls = bench.compiled_bytes, []

    def cut_at_the_second_row(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_compiled_bytes(*a, **k)

    monkeypatch.setattr(bench, "compiled_bytes", cut_at_the_second_row)
    argv = ["--smoke", "--impls", "pallas", "chunk", "--no-check", "--no-decode", "--tag",
            "test", "--out", str(tmp_path)]
    with pytest.raises(KeyboardInterrupt):
        bench.main(argv)
    (row,) = json.loads((tmp_path / "bench_kernels_test.json").read_text())["rows"]
    assert list(row["results"]) == ["pallas"]
    assert row["results"]["pallas"]["fwd_bwd_ms"] > 0
    assert "| pallas |" in (tmp_path / "bench_kernels_test.md").read_text()


def test_bench_kernels_decode_row_times_and_checks_the_kernel():
    """The decode benchmark at its smoke size (CPU, the kernel interpreted): the XLA step and
    the fused kernel both timed, the kernel's outputs within float32 rounding of XLA's over the
    scan of steps, and the report's decode table carries both."""
    bench = load_experiment("bench_kernels")
    import jax.numpy as jnp
    row = bench.bench_decode(2, jnp.float32, None, smoke=True, steps=3)
    assert row["step_us"] > 0 and row["pallas_step_us"] > 0 and row["state_touch_us"] > 0
    assert 0 <= row["pallas_vs_xla_rel_err"] < 1e-5
    page = load_experiment("bench_kernels_report").markdown(
        {"tag": "test", "device": "cpu", "jax": "x", "date": "x", "command": "x",
         "copy_bandwidth_GBps": 1.0, "checks": [], "rows": [], "decode": [row]})
    assert "GSA step (kernel)" in page
    assert f"| {row['step_us']:.1f} | {row['pallas_step_us']:.1f} | " in page


def test_bench_kernels_chunk_targets():
    """Issue 15's targets read off a hand-made report: 2x the kernels is met, above is missed,
    and a forward slower than forward+backward is flagged."""
    bench = load_experiment("bench_kernels")

    def row(chunk_fwd, chunk_fb, chunk_mem):
        return {"shape": dict(zip("B T H K M".split(), (1, 2, 3, 4, 5))),
                "results": {"pallas": {"fwd_ms": 1.0, "fwd_bwd_ms": 4.0, "mem_bytes": 100},
                            "chunk": {"fwd_ms": chunk_fwd, "fwd_bwd_ms": chunk_fb,
                                      "mem_bytes": chunk_mem}}}

    met, missed = bench.target_lines([row(2.0, 8.0, 200), row(5.0, 4.5, 201)])[-2:]
    for item in ("chunk fwd 2.00x kernels (met)", "chunk fwd+bwd 2.00x (met)",
                 "chunk memory 2.00x (met)", "chunk fwd <= its fwd+bwd (met)"):
        assert item in met
    for item in ("chunk fwd 5.00x kernels (MISSED)", "chunk fwd+bwd 1.12x (met)",
                 "chunk memory 2.01x (MISSED)", "chunk fwd <= its fwd+bwd (MISSED)"):
        assert item in missed


def test_bench_kernels_per_token_target_compares_like_shapes():
    """The 1 x 65536 per-token cost is compared with 8 x 2048 at the same H, K, M, not with
    whichever 8 x 2048 row comes last (the M = 128 one once made a 1.07x ratio read 0.37x)."""
    bench = load_experiment("bench_kernels")

    def row(B, T, M, fwd_bwd_ms):
        return {"shape": dict(zip("B T H K M".split(), (B, T, 16, 128, M))),
                "results": {"pallas": {"fwd_ms": 1.0, "fwd_bwd_ms": fwd_bwd_ms}}}

    rows = [row(8, 2048, 64, 2.0), row(8, 2048, 128, 6.0), row(1, 65536, 64, 10.0)]
    (line,) = [x for x in bench.target_lines(rows) if x.startswith("- per-token")]
    assert "= 1.25x that of 8 x 2048 (MISSED)" in line   # (10 / 65536) / (2 / 16384)


@pytest.mark.slow  # ~20 small compiles: CI's second step
def test_chunk_parts_times_every_part_of_both_passes(tmp_path):
    parts = load_experiment("chunk_parts")
    assert parts.main(["--tag", "cpu", "--shape", "1", "40", "--heads", "2",
                       "--chunk-size", "16", "--repeats", "1", "--out-dir", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "chunk_parts_cpu.json").read_text())
    from gsa_jax.ops import chunk
    levels = [f"level{h}" for h in chunk._level_sizes(16)]
    expected = {"prepare", "delta", "scan", "inter", "diag", "intra", "diag_vjp", "intra_vjp",
                "scan_vjp", "full_fwd", "full_fwd_bwd"} | set(levels) | \
        {f"{n}_vjp" for n in levels}
    assert set(record["passes"]) == {name for name, *_ in parts.PASSES}
    for times in record["passes"].values():
        assert set(times) == expected
        assert all(t > 0 for t in times.values())
    assert "| full_fwd_bwd |" in (tmp_path / "chunk_parts_cpu.md").read_text()


@pytest.mark.slow  # the kernels interpreted, forward and backward, twice: CI's second step
def test_kernel_shard_check_runs_the_kernels_inside_shard_map(tmp_path):
    """experiments/kernel_shard_check.py (its GPU run is committed) on the CPU, kernels
    interpreted: per_shard's wrapper is really in the program (not skipped on one device), it
    changes no value or gradient, and nothing is all-gathered."""
    check = load_experiment("kernel_shard_check")
    assert check.main(["--tag", "cpu", "--interpret", "--shape", "2", "40", "2", "1", "16",
                       "16", "16", "--out-dir", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "kernel_shard_check_cpu.json").read_text())
    assert [r["dtype"] for r in record["rows"]] == ["float32", "bfloat16"]
    for row in record["rows"]:
        assert row["ok"] and row["shard_maps_in_jaxpr"] >= 2 and row["all_gathers"] == 0
        assert max(row["sharded_vs_plain"].values()) == 0.0
        assert 0 < max(row["sharded_vs_chunk_f32"].values()) < 3e-2


def test_embed_grad_reports_both_embeddings(tmp_path):
    """experiments/embed_grad.py --smoke: four cases written, finite times; gsa_jax's Embed sums
    the gradient within float32 rounding of the float64 sum, flax's bfloat16 one does not."""
    embed_grad = load_experiment("embed_grad")
    embed_grad.main(["--smoke", "--tag", "test", "--repeats", "1", "--out-dir", str(tmp_path)])
    record = json.loads((tmp_path / "embed_grad_test.json").read_text())
    cases = {(c["module"], c["ids"]): c for c in record["cases"]}
    assert len(cases) == 4 and all(c["ms"] > 0 for c in cases.values())
    assert cases[("gsa_jax Embed", "repeated")]["rel_err"] < 1e-5
    assert cases[("flax nn.Embed", "repeated")]["rel_err"] > 1e-3
    assert "| repeated | 16 | gsa_jax Embed |" in (tmp_path / "embed_grad_test.md").read_text()


def test_bench_kernels_gate_scale_reaches_every_row(tmp_path, monkeypatch):
    """--gate-scale S: the timed rows and the peer get gates g = logsigmoid(x) / S (the peer,
    faked, records its inputs), and the report says which gates it timed."""
    import numpy as np
    bench = load_experiment("bench_kernels")
    seen, timed = [], []

    def fake_peer(inputs, segment_ids, dtype_name):
        seen.append(np.asarray(inputs[4]))
        return {"fwd_ms": 1.0, "fwd_bwd_ms": 2.0, "mem_bytes": 3}, np.zeros(inputs[0].shape)

    real_time = bench.time_jax

    def recording_time(fn, args, *a, **kw):
        timed.append(np.asarray(args[4], np.float32) if len(args) == 5 else None)
        return real_time(fn, args, *a, **kw)

    monkeypatch.setattr(bench, "peer_available", lambda: True)
    monkeypatch.setattr(bench, "bench_peer", fake_peer)
    monkeypatch.setattr(bench, "time_jax", recording_time)
    argv = ["--smoke", "--impls", "chunk", "peer", "--no-check", "--no-decode", "--gate-scale",
            "0.5", "--tag", "test", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    shape = (1, 64, 2, 16, 16)
    want = np.asarray(bench.make_inputs(shape, bench.jnp.float32, gate_scale=0.5)[4])
    layer_like = np.asarray(bench.make_inputs(shape, bench.jnp.float32)[4])   # S = 8
    np.testing.assert_allclose(want, 16 * layer_like, rtol=1e-6)
    np.testing.assert_allclose(seen[0], want)
    chunk_gates = [g for g in timed if g is not None]
    assert chunk_gates and all(np.allclose(g, want, rtol=1e-2, atol=1e-2) for g in chunk_gates)
    report = json.loads((tmp_path / "bench_kernels_test.json").read_text())
    assert report["gate_scale"] == 0.5
    assert "g = logsigmoid(x) / 0.5" in (tmp_path / "bench_kernels_test.md").read_text()


def test_profile_kernels_counts_only_the_traced_calls(tmp_path):
    """profile_kernels at the smoke shape on the CPU (chunk form): per pass a device time per
    call and per-op rows; the warm-up call stays outside the trace, so every op of the jitted
    function appears a whole number of times per call (2 traced calls; a warm-up inside the
    trace would give 1.5)."""
    prof = load_experiment("profile_kernels")
    assert prof.main(["--smoke", "--calls", "2", "--tag", "test", "--out-dir",
                      str(tmp_path)]) == 0
    report = json.loads((tmp_path / "profile_kernels_test.json").read_text())
    (row,) = report["rows"]
    assert set(row["passes"]) == {"fwd", "fwd_bwd"}
    for s in row["passes"].values():
        assert s["device_ms_per_step"] > 0 and s["top_ops"]
        assert all(o["calls_per_step"] >= 1 and float(o["calls_per_step"]).is_integer()
                   for o in s["top_ops"]), s["top_ops"]
        assert abs(sum(c["share"] for c in s["categories"]) - 1) < 1e-6
    assert "## (1, 128, 2, 16, 16) fwd_bwd" in (tmp_path / "profile_kernels_test.md").read_text()


def test_bench_kernels_peer_jt_row_records_why_it_cannot_run():
    """The peer_jt row never stops the sweep: without a GPU (jax-triton's launch) the failure is
    recorded as the row's error, for equal rows and packed ones."""
    bench = load_experiment("bench_kernels")
    for shape in ((1, 64, 2, 16, 16), (1, 64, 2, 16, 16, 2)):
        row = bench.peer_jt_row(shape, jnp.float32)
        assert set(row) == {"error"} and row["error"]
    check = bench.check((1, 64, 2, 16, 16), jnp.float32, impl="peer_jt")
    assert check["impl"] == "peer_jt" and check["error"]


@pytest.mark.slow  # 17 s on the 2-core CI machine: CI's second step
def test_bench_kernels_peer_jt_runs_after_the_peer_and_is_compared_with_its_output(
        tmp_path, monkeypatch):
    """peer_jt (the peer's kernels from JAX) is timed after the peer at each shape, with the
    peer's autotune picks, and its output is compared with the peer's (the same kernels: they
    must agree) and with ours. Both are faked here: the peer returns our output x (1 + 1e-3),
    and so does the JAX launch of its kernels."""
    import numpy as np
    from gsa_jax.ops import fla_triton
    bench = load_experiment("bench_kernels")
    order, asked = [], []

    def fake_peer(inputs, segment_ids, dtype_name):
        order.append("peer")
        o = _our_output(bench, inputs, segment_ids, dtype_name)
        return {"fwd_ms": 1.0, "fwd_bwd_ms": 2.0, "mem_bytes": 3}, o * (1 + 1e-3)

    def fake_peer_jt_fn(seg, configs=None):
        order.append("peer_jt")
        asked.append(configs)
        ours = bench.gsa_fn("pallas", seg)
        return lambda *a: ours(*a).astype(jnp.float32) * (1 + 1e-3)   # no bf16 rounding

    monkeypatch.setattr(bench, "peer_available", lambda: True)
    monkeypatch.setattr(bench, "bench_peer", fake_peer)
    monkeypatch.setattr(bench, "peer_jt_fn", fake_peer_jt_fn)
    monkeypatch.setattr(fla_triton, "tuned_configs", lambda *a, **k: {"gla_o": {"BV": 32}})
    argv = ["--smoke", "--impls", "pallas", "peer", "peer_jt", "--no-check", "--no-decode",
            "--tag", "test", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    assert order == ["peer", "peer_jt"] and asked == [{"gla_o": {"BV": 32}}]
    (row,) = json.loads((tmp_path / "bench_kernels_test.json").read_text())["rows"]
    jt = row["results"]["peer_jt"]
    assert list(row["results"]) == ["pallas", "peer", "peer_jt"]
    assert jt["rel_err_o_vs_peer"] < 1e-5
    assert abs(jt["rel_err_o_vs_pallas"] - 1e-3) < 2e-4
    assert "fla's autotune picks" in jt["configs"]


def test_bench_kernels_keeps_the_peers_autotune_results_for_the_next_process(
        tmp_path, monkeypatch):
    """--peer-tune-cache: Triton's cache is pointed at a fresh directory seeded with the given
    autotune results before the peer runs (TRITON_CACHE_AUTOTUNING on), and afterwards only the
    autotune results (seeded and new, not compiled kernels) are written out for the next
    process. The peer is faked: it checks the seeded file is in place and 'autotunes' by
    writing a result and a compiled kernel into the cache."""
    import tarfile
    bench = load_experiment("bench_kernels")
    for var in ("TRITON_CACHE_DIR", "TRITON_CACHE_AUTOTUNING"):
        monkeypatch.delenv(var, raising=False)   # restored after the test
    seed = tmp_path / "seed"
    (seed / "aa11").mkdir(parents=True)
    (seed / "aa11" / "chunk_gsa_fwd_k.autotune.json").write_text('{"configs_timings": 1}')
    (seed / "aa11" / "chunk_gsa_fwd_k.cubin").write_text("not an autotune result")
    seen = {}

    def fake_peer(inputs, segment_ids, dtype_name):
        import os
        cache = os.environ["TRITON_CACHE_DIR"]
        seen["autotuning"] = os.environ.get("TRITON_CACHE_AUTOTUNING")
        seen["seeded"] = sorted(os.listdir(os.path.join(cache, "aa11")))
        os.makedirs(os.path.join(cache, "bb22"))
        for name in ("chunk_gsa_bwd_k.autotune.json", "chunk_gsa_bwd_k.cubin"):
            with open(os.path.join(cache, "bb22", name), "w") as f:
                f.write("{}")
        o = _our_output(bench, inputs, segment_ids, dtype_name)
        return {"fwd_ms": 1.0, "fwd_bwd_ms": 2.0, "mem_bytes": 3}, o

    monkeypatch.setattr(bench, "peer_available", lambda: True)
    monkeypatch.setattr(bench, "bench_peer", fake_peer)
    argv = ["--smoke", "--impls", "pallas", "peer", "--no-check", "--no-decode", "--tag",
            "test", "--out", str(tmp_path), "--peer-tune-cache", str(seed)]
    assert bench.main(argv) == 0
    assert seen == {"autotuning": "1", "seeded": ["chunk_gsa_fwd_k.autotune.json"]}
    with tarfile.open(tmp_path / "peer_tune_cache_test.tgz") as tar:
        assert sorted(tar.getnames()) == ["aa11/chunk_gsa_fwd_k.autotune.json",
                                          "bb22/chunk_gsa_bwd_k.autotune.json"]
        assert tar.extractfile("aa11/chunk_gsa_fwd_k.autotune.json").read() == \
            b'{"configs_timings": 1}'

"""experiments/gate_extremes.py: its per-tile criterion is the kernels' own branch predicate
(pallas_kernels.chunk_math.is_extreme) on the same gates, a hand case sits on each side of the
bound, and the script reads a paused MQAR cell's state end to end."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:   # `experiments` is not an installed package
    sys.path.insert(0, ROOT)

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from experiments import gate_extremes as ge  # noqa: E402
from pallas_kernels import chunk_math, common  # noqa: E402


def test_hand_case_on_both_sides_of_the_bound():
    """A channel at g = -2 per step decays 128 over a 64-step chunk (past 120), one at -1.8
    decays 115.2 (not); the strongest channel of the tile decides; a partial last chunk is
    not counted."""
    T, C = 2 * 64 + 5, 64
    g = np.zeros((1, T, 2, 3), np.float32)
    g[0, :, 0, 1] = -2.0      # head 0: one sharp channel among mild ones
    g[0, :, 0, 0] = -0.1
    g[0, :, 1, :] = -1.8      # head 1: every channel just under the bound
    d = np.asarray(ge.chunk_decays(jnp.asarray(g), C))
    assert d.shape == (1, 2, 2)
    np.testing.assert_allclose(d[0, :, 0], 128.0, rtol=1e-6)
    np.testing.assert_allclose(d[0, :, 1], 115.2, rtol=1e-6)
    assert ((d > chunk_math.MAX_CHUNK_DECAY) == np.array([[[True, False]] * 2])).all()


@pytest.mark.parametrize("C", [16, 64])
def test_criterion_is_the_kernels_branch_predicate(C):
    """On random gates with a heavy tail (some tiles past the bound, some not), the script's
    count per (row, head, chunk) equals chunk_math.is_extreme on that tile's gates."""
    rng = np.random.default_rng(0)
    B, H, K, N = 2, 3, 8, 5
    # per tile (row, chunk, head): mild, near the bound, or far past it
    scale = rng.choice([0.02, 1.5, 3.0], size=(B, N, 1, H, 1)) * (64 / C)
    g = -scale * rng.exponential(1.0, size=(B, N, C, H, K))
    g = jnp.asarray(g.reshape(B, N * C, H, K), jnp.float32)
    ours = np.asarray(ge.chunk_decays(g, C) > chunk_math.MAX_CHUNK_DECAY)
    causal = jnp.tril(jnp.ones((C, C), bool))
    masks = common.chunk_masks(None, None, None, causal)
    kernel = np.array([[[bool(chunk_math.is_extreme(chunk_math.gates(
        g[b, n * C:(n + 1) * C, h], masks))) for h in range(H)] for n in range(N)]
        for b in range(B)])
    assert ours.any() and not ours.all()   # both branches are exercised
    np.testing.assert_array_equal(ours, kernel)


@pytest.mark.slow   # a tiny cell's compile and two model passes (~20 s on 2 cores)
@pytest.mark.parametrize("model", ["gla", "gsa"])
def test_reads_a_paused_cell(tmp_path, model):
    """A GLA or GSA cell trained one chunk and paused (mqar_authors --pause-seconds 0) is read back:
    the report holds every run x layer at init and trained, at the saved step, with its
    fractions in [0, 1]; a state of another setup is refused (mqar_authors.restore_cell)."""
    from experiments import mqar_authors as ma
    cell = ["--smoke", "--vocab-size", "32", "--seq-len", "16", "--kv-pairs", "2",
            "--train-examples", "64", "--test-examples", "20", "--batch-size", "16",
            "--widths", "8", "--lr", "3e-3", "2e-2", "--seeds", "2", "--max-epochs", "4",
            "--eval-every", "2"]
    states = tmp_path / "s"
    assert ma.main(cell + ["--models", model, "--tag", "t", "--out-dir", str(tmp_path),
                           "--state-dir", str(states), "--pause-seconds", "0"]) == 0
    argv = ["--state", str(states / f"{model}_D8"), "--model", model, "--rows", "8",
            "--chunk", "8", "4", "--tag", "t", "--out-dir", str(tmp_path)]
    assert ge.main(argv + cell) == 0
    r = json.loads((tmp_path / "gate_extremes_t.json").read_text())
    assert r["step"] == 2 and r["width"] == 8
    for which in ("init", "trained"):
        assert sorted((x["run"], x["layer"]) for x in r[which]) == [
            (run, layer) for run in range(4) for layer in range(4)]
        assert all(0.0 <= x[f"extreme_C{c}"] <= 1.0 for x in r[which] for c in (8, 4))
        assert all(x["g_min"] < 0 for x in r[which])
    with pytest.raises(ValueError, match="another setup"):
        ge.main(argv + [a if a != "2e-2" else "1e-2" for a in cell])


@pytest.mark.slow  # 25 s on the 2-core CI machine: CI's second step
def test_bench_gate_strength_smoke(tmp_path):
    """experiments/bench_gate_strength.py --smoke (chunk form, CPU): one row per gate scale,
    the share of tiles past the bound rising from none (the benchmarks' mild gate) to all as
    the gate sharpens, finite times, ratios against the mildest row."""
    from experiments import bench_gate_strength as bgs
    assert bgs.main(["--smoke", "--tag", "t", "--out-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_gate_strength_t.json").read_text())["rows"]
    assert [r["gate_scale"] for r in rows] == bgs.SCALES
    share = [r["extreme_tiles"] for r in rows]
    assert share[0] == 0.0 and share[-1] == 1.0 and share == sorted(share)
    assert rows[0]["fwd_ratio"] == 1.0 and all(r["fwd_bwd_ms"] > 0 for r in rows)


@pytest.mark.slow   # the kernels interpreted at the smoke shape, twice (~25 s on 2 cores)
def test_bench_gate_strength_times_and_checks_the_sub_chunk_tier(tmp_path):
    """--impls pallas --sub-chunk 0 16 --check (the GPU run's options) at the smoke shape:
    rows for both tunings, and the kernels with the tier agree with the float32 chunk form at
    a gate sharp enough to send tiles past the bound (bf16 inputs: errors of bf16 size)."""
    from experiments import bench_gate_strength as bgs
    assert bgs.main(["--smoke", "--impls", "pallas", "--sub-chunk", "0", "16", "--scales", "8",
                     "0.5", "--check", "0.5", "--tag", "t", "--out-dir", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "bench_gate_strength_t.json").read_text())
    assert sorted({(x["sub_chunk"], x["gate_scale"]) for x in r["rows"]}) == [
        (0, 0.5), (0, 8.0), (16, 0.5), (16, 8.0)]
    assert [c["sub_chunk"] for c in r["checks"]] == [0, 16]
    for c in r["checks"]:
        assert c["finite"] and c["extreme_tiles"] > 0
        assert max(c["rel_err"].values()) < 0.1, c
    assert "| 16 |" in (tmp_path / "bench_gate_strength_t.md").read_text()

"""experiments/efficiency.py (the paper's Figure 4) at tiny sizes on the CPU: the files it writes,
finite measurements for every (model, T), and, from the numbers it records, GSA's decode state
of constant size against attention's KV cache growing by exactly its per-token bytes; cases
past the time budget and an unavailable peer are recorded, not fatal; the peer's fallback torch model is
our model (same loss from the same weights)."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsa_jax import layer_layout
from script_util import load_experiment

def _efficiency():
    return load_experiment("efficiency")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One `--smoke` run (a subprocess per case, as on the GPU); its record and directory."""
    eff = _efficiency()
    out = tmp_path_factory.mktemp("efficiency")
    argv = ["--smoke", "--tag", "test", "--out-dir", str(out)]
    assert eff.main(argv) == 0
    return eff, json.loads((out / "efficiency_test.json").read_text()), out


@pytest.mark.slow  # over 30 s on a 2-core CPU: CI's second step
def test_smoke_files_and_train_rows(smoke):
    eff, record, out = smoke
    config = record["config"]
    assert record["command"].endswith("experiments/efficiency.py --smoke --tag test --out-dir "
                                      + str(out))
    assert record["environment"]["backend"] == "cpu"
    expected = {(m, T) for m in eff.JAX_TRAIN for T in config["seq_lens"]}
    train = {(r["model"], r["T"]): r for r in record["rows"] if r["part"] == "train"}
    assert set(train) == expected  # no peer in a smoke run
    vocab = eff.model_config(eff.parse_args(["--smoke"]), "gsa").vocab_size
    for (model, T), row in train.items():
        assert row["status"] == "ok", row
        assert row["B"] * T == config["tokens"]
        for key in ("step_ms", "min_step_ms", "tokens_per_s", "compiled_bytes", "compile_s"):
            assert math.isfinite(row[key]) and row[key] > 0, (model, T, key)
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / (row["step_ms"] / 1e3))
        # A few AdamW steps from a 0.02-std init: the loss is still near log(V).
        assert abs(row["loss"] - math.log(vocab)) < 0.5, row
        assert row["peak_bytes"] is None  # the CPU reports no device memory stats
    assert train[("gsa-recompute", 32)]["recompute"] == "jax.checkpoint around the chunk form"
    assert train[("gsa", 32)]["form"] == "chunk"
    md = (out / "efficiency_test.md").read_text()
    assert md.count("| gsa-recompute |") == len(config["seq_lens"])
    if eff.common.pyplot() is not None:  # matplotlib is the optional [plot] extra
        for suffix in ("", "_throughput", "_memory", "_latency"):
            assert (out / f"efficiency_test{suffix}.png").stat().st_size > 1000


@pytest.mark.slow  # shares the slow `smoke` fixture (a smoke run, ~80 s)
def test_smoke_decode_state_constant_vs_growing_kv_cache(smoke):
    """GSA's cache is L·H·(K·M + M·V) float32 at every N; attention's grows by exactly
    L·ΔN·(2·Hkv·d·itemsize + 1) bytes (k and v slots plus the valid flag) between lengths."""
    eff, record, _ = smoke
    config = record["config"]
    args = eff.parse_args(["--smoke"])
    decode = {(r["model"], r["N"]): r for r in record["rows"] if r["part"] == "decode"}
    assert set(decode) == {(m, n) for m in eff.DECODE_MODELS for n in config["gen_lens"]}
    for row in decode.values():
        assert row["status"] == "ok", row
        assert row["generated"] == row["N"] and row["prefix"] == config["prefix"]
        for key in ("latency_ms", "prefill_ms", "ms_per_token"):
            assert math.isfinite(row[key]) and row[key] >= 0, (row["model"], key)
        assert row["latency_ms"] > 0

    gsa = eff.model_config(args, "gsa", decode=True)
    H, M = gsa.num_heads, gsa.num_slots
    dk = dv = gsa.hidden_size // H
    state = gsa.num_layers * H * (dk * M + M * dv) * 4
    assert [decode[("gsa", n)]["cache_bytes"] for n in config["gen_lens"]] == \
        [state] * len(config["gen_lens"])

    attn = eff.model_config(args, "transformer", decode=True)
    d = attn.hidden_size // attn.attn_num_heads
    per_token = attn.num_layers * (2 * attn.attn_num_heads * d *
                                   jnp.dtype(config["decode_dtype"]).itemsize + 1)
    sizes = [decode[("transformer", n)]["cache_bytes"] for n in config["gen_lens"]]
    steps = np.diff(config["gen_lens"])
    assert list(np.diff(sizes)) == list(steps * per_token)
    assert sizes[0] > state  # already at the smallest N


def test_budget_merge_and_unavailable_peer(tmp_path):
    """--budget-s 0 records every case as skipped (nothing is compiled); --merge adds to a
    report; the peer without a CUDA torch (none here) is 'unavailable', not an error."""
    eff = _efficiency()
    argv = ["--smoke", "--tag", "budget", "--out-dir", str(tmp_path), "--budget-s", "0",
            "--seq-lens", "32", "--gen-lens", "4", "8"]
    assert eff.main(argv) == 0
    rows = json.loads((tmp_path / "efficiency_budget.json").read_text())["rows"]
    assert len(rows) == len(eff.JAX_TRAIN) + 2 * len(eff.DECODE_MODELS)
    assert all(r["status"] == "skipped" and "--merge" in r["reason"] for r in rows)
    # --merge keeps the other cases' rows and unites the sweeps; other settings are refused.
    more = ["--smoke", "--tag", "budget", "--out-dir", str(tmp_path), "--budget-s", "0",
            "--seq-lens", "64", "--parts", "train", "--merge"]
    assert eff.main(more) == 0
    merged = json.loads((tmp_path / "efficiency_budget.json").read_text())
    assert len(merged["rows"]) == len(rows) + len(eff.JAX_TRAIN)
    assert merged["config"]["seq_lens"] == [32, 64] and len(merged["commands"]) == 2
    with pytest.raises(SystemExit, match="other settings"):
        eff.main(more + ["--tokens", "256"])
    row = eff.peer_case(eff.parse_args(["--smoke"]), "fla-gsa", 32)
    assert row["status"] == "unavailable" and row["reason"]


@pytest.mark.slow  # over 30 s on a 2-core CPU: CI's second step
def test_compile_only_fills_the_cache_that_a_timed_run_reads(tmp_path):
    """--compile-only compiles every JAX train step from shapes (no timing, no decode, no
    peer) into --compile-cache; a timed run on that cache writes no new executable."""
    eff = _efficiency()
    cache = tmp_path / "cache"
    with pytest.raises(SystemExit):  # without a cache there is nothing to keep
        eff.parse_args(["--smoke", "--compile-only"])
    argv = ["--smoke", "--tag", "warm", "--out-dir", str(tmp_path), "--seq-lens", "32",
            "--compile-only", "--compile-cache", str(cache), "--in-process"]
    assert eff.main(argv) == 0
    rows = json.loads((tmp_path / "efficiency_warm.json").read_text())["rows"]
    assert {r["model"] for r in rows} == set(eff.JAX_TRAIN)
    assert all(r["part"] == "train" and r["status"] == "compiled" and "step_ms" not in r
               for r in rows), rows
    def steps():  # the train steps' executables (jit of `step`) in the cache
        return {path.name for path in cache.iterdir() if path.name.startswith("jit_step")}

    compiled = steps()
    assert len(compiled) == len(eff.JAX_TRAIN)
    timed = ["--smoke", "--tag", "timed", "--out-dir", str(tmp_path), "--seq-lens", "32",
             "--parts", "train", "--compile-cache", str(cache), "--in-process"]
    assert eff.main(timed) == 0
    rows = json.loads((tmp_path / "efficiency_timed.json").read_text())["rows"]
    assert all(r["status"] == "ok" for r in rows), rows
    assert steps() == compiled, "a train step was compiled again, not read from the cache"


@pytest.mark.reference
def test_torch_fallback_peer_is_our_model():
    """The peer's fallback model (torch blocks around fla's chunk_gsa, used on the GPU when
    `fla.models` does not import) computes our model's loss from the same weights. fla's
    kernels need a GPU: a naive torch loop of the recurrence stands in for chunk_gsa here."""
    torch = pytest.importorskip("torch")
    import sys
    import types

    import flax.linen as nn

    from gsa_jax.models import CausalLM, get_preset

    def naive_chunk_gsa(q, k, v, s, g, scale, checkpoint_level):
        B, T, H, K = q.shape
        hk = torch.zeros(B, H, K, s.shape[-1])
        hv = torch.zeros(B, H, s.shape[-1], v.shape[-1])
        out = []
        for t in range(T):
            decay = g[:, t].exp()                                        # [B, H, M]
            hk = hk * decay[:, :, None, :] + k[:, t, :, :, None] * s[:, t, :, None, :]
            p = torch.softmax(scale * torch.einsum("bhkm,bhk->bhm", hk, q[:, t]), -1)
            hv = hv * decay[..., None] + s[:, t, :, :, None] * v[:, t, :, None, :]
            out.append(torch.einsum("bhmv,bhm->bhv", hv, p))
        return torch.stack(out, 1), None

    stubs = {"fla": types.ModuleType("fla"), "fla.ops": types.ModuleType("fla.ops"),
             "fla.ops.gsa": types.ModuleType("fla.ops.gsa")}
    stubs["fla.ops.gsa"].chunk_gsa = naive_chunk_gsa
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        peer = load_experiment("efficiency_peer")
        cfg = get_preset("gsa-tiny", num_layers=2, initializer_range=0.1)
        net = peer._torch_gsa_lm(cfg, level=2)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    model = CausalLM(cfg)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(5), jnp.zeros((1, 1), jnp.int32)))
    p = layer_layout.to_unscanned(params["params"])  # gsa-tiny scans: one tree per layer
    t = lambda x: torch.tensor(np.asarray(x))  # noqa: E731
    with torch.no_grad():
        net.embed.weight.copy_(t(p["embed"]["embedding"]))
        net.norm.weight.copy_(t(p["norm"]["scale"]))
        net.lm_head.weight.copy_(t(p["lm_head"]["kernel"]).T)
        for i, block in enumerate(net.blocks):
            layer = p[f"layer_{i}"]
            block.attn_norm.weight.copy_(t(layer["attn_norm"]["scale"]))
            block.mlp_norm.weight.copy_(t(layer["mlp_norm"]["scale"]))
            block.g_norm.weight.copy_(t(layer["mixer"]["g_norm"]["scale"]))
            for name in ("q_proj", "k_proj", "v_proj", "f_proj", "o_proj"):
                getattr(block, name).weight.copy_(t(layer["mixer"][name]["kernel"]).T)
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(block, name).weight.copy_(t(layer["mlp"][name]["kernel"]).T)
    tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, (2, 12))
    logits = np.asarray(jax.jit(model.apply)(params, jnp.asarray(tokens)), np.float64)[:, :-1]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
    with torch.no_grad():
        got = float(net(torch.tensor(tokens), torch.tensor(tokens)))
    assert got == pytest.approx(want, rel=1e-4)


def test_models_choose_the_decode_cases_too():
    """--models narrows the decode part as it does the train part (a rerun of one model's
    generation does not redo the other's); the default keeps both decode models."""
    eff = _efficiency()
    decode = lambda argv: [c for c in eff.cases(eff.parse_args(argv)) if c[0] == "decode"]  # noqa: E731
    assert decode(["--parts", "decode", "--models", "transformer"]) == [("decode", "transformer")]
    assert decode(["--parts", "decode", "--models", "gsa-recompute", "gla"]) == [("decode", "gsa")]
    assert decode(["--parts", "decode"]) == [("decode", "gsa"), ("decode", "transformer")]


@pytest.mark.slow  # shares the slow `smoke` fixture (a smoke run, ~80 s)
def test_figure_draws_only_the_parts_a_report_has(smoke):
    """A train-only report (e.g. a sweep merged from train runs) gets the two train panels, not
    an empty latency axis; the full smoke report gets all three."""
    eff, record, _ = smoke
    if eff.common.pyplot() is None:
        pytest.skip("matplotlib (the [plot] extra) is not installed")
    full = eff.figure(record)
    train_only = eff.figure(dict(record, rows=[r for r in record["rows"] if r["part"] == "train"]))
    try:
        assert [a.get_xlabel() for a in full.axes] == [
            "sequence length T", "sequence length T",
            f"generated tokens N (after {record['config']['prefix']})"]
        assert [a.get_xlabel() for a in train_only.axes] == ["sequence length T"] * 2
        assert all(a.has_data() for a in train_only.axes)
    finally:
        eff.common.pyplot().close(full)
        eff.common.pyplot().close(train_only)

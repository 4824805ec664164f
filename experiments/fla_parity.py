"""fla checkpoints in gsa-jax on a GPU: the logits of small random flash-linear-attention (fla)
GSA and GLA models, computed by fla with its Triton kernels and by gsa-jax from the saved
checkpoint (gsa_jax.hf.fla.load_fla), in bf16 and in float32.

    PYTHONPATH=/tmp/site:. python experiments/fla_parity.py --tag h200     # ~3-5 min on an H200
    (after: python3 -m pip install -q --no-index --no-deps --target /tmp/site shared/wheels/*.whl)

Per case (a model, a sequence length) the checkpoint is saved in bf16, so both sides hold the
same weights; then four sets of logits [B, T, V]:

    fla_fp32   fla in float32 (its Triton kernels with IEEE float32 dots: TRITON_F32_DEFAULT=ieee)
    ours_fp32  gsa-jax in float32 (matmul precision "highest")
    fla_bf16   fla in bf16 (weights and activations), as the authors run it
    ours_bf16  gsa-jax with bf16 compute (its ops accumulate in float32), per form of our op
               (GSA: chunk and Pallas; GLA: chunk)

and their differences: rel_max = max|a − b| / max|b|, rel_rms = rms(a − b) / rms(b), top-1
agreement. The float32 pair checks the function (expected ~1e-5 or below); each bf16 result is
compared with fla_fp32, so our bf16 error stands beside fla's own bf16 error. Verdict per case:
ours_fp32 within 1e-4 (rel_max) of fla_fp32, and ours_bf16's rel_rms to fla_fp32 at most twice
fla_bf16's (+1e-3).

Sequence lengths 48 (fla's layers then use their fused_recurrent kernels) and 512 (chunk
kernels). Results: experiments/results/fla_parity_<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402

# name: (fla model type, fla config fields). Width 512, 2 layers: the head dims of the paper's
# 1.3B/2.7B GSA models are 512 (here 128) — small enough to run in seconds.
CASES = {
    "gsa": ("gsa", dict(num_heads=4, num_slots=64, gate_logit_normalizer=8)),
    "gsa_gqa_conv": ("gsa", dict(num_heads=4, num_kv_heads=2, num_slots=64,
                                 gate_logit_normalizer=4, use_short_conv=True)),
    "gla": ("gla", dict(num_heads=4)),
}
BASE = dict(hidden_size=512, num_hidden_layers=2, vocab_size=4096)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tag", required=True, help="results suffix, e.g. h200")
    p.add_argument("--cases", nargs="+", default=sorted(CASES), choices=sorted(CASES))
    p.add_argument("--seq-lens", nargs="+", type=int, default=[48, 512])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--gsa-impls", nargs="+", default=["chunk", "pallas"],
                   choices=["chunk", "pallas", "recurrent", "parallel"],
                   help="forms of our GSA op run in bf16 (float32: chunk)")
    p.add_argument("--device", default="cuda", help="torch device of fla (cuda; cpu only "
                   "with fla's kernels replaced, as the tests do)")
    p.add_argument("--out-dir", help="results directory (default experiments/results)")
    p.add_argument("--full-autotune", action="store_true",
                   help="let Triton autotune fla's kernels over all their configs (default: "
                        "the first config of each, see `one_config_autotune`)")
    p.add_argument("--merge-files", nargs="+", metavar="JSON",
                   help="no run: merge these fla_parity results (e.g. one call per --cases, "
                        "as the device's 10-minute calls need) into fla_parity_<tag>")
    return p.parse_args(argv)


def merge(args) -> int:
    """The rows of several fla_parity records as one record, with every run's command."""
    import json
    records = [json.loads(pathlib.Path(f).read_text()) for f in args.merge_files]
    rows = [row for r in records for row in r["rows"]]
    config = dict(records[0]["config"])
    config["cases"] = {k: v for r in records for k, v in r["config"]["cases"].items()}
    config["seq_lens"] = sorted({t for r in records for t in r["config"]["seq_lens"]})
    record = {"config": config, "rows": rows, "environment": records[0]["environment"],
              "commands": [r["command"] for r in records], "command": records[0]["command"]}
    args.batch = config["batch"]
    common.write_and_print(args.tag, "fla_parity", record, markdown(rows, args),
                           out_dir=args.out_dir)
    return 0 if all(r["ok"] for r in rows) else 1


def one_config_autotune() -> None:
    """Make `triton.autotune` keep only the first config of each kernel (call before importing
    fla, whose decorators run at import). Parity does not depend on the tiles a kernel uses,
    and autotuning every config of fla's kernels took ~80 s per (case, dtype) on an H200: the
    six cases' two dtypes would not fit one 10-minute device call."""
    import triton
    if getattr(triton.autotune, "_gsa_one_config", False):
        return
    full = triton.autotune

    def first_config(configs, *args, **kwargs):
        return full(list(configs)[:1], *args, **kwargs)

    first_config._gsa_one_config = True
    triton.autotune = first_config


def randomize(torch, model, seed: int) -> None:
    """Every parameter random: matrices N(0, 1/fan_in) (embeddings N(0, 1)), norm scales
    1 + N(0, 0.3²), biases N(0, 0.5²): activations of order 1, logits far from uniform."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("bias"):
                p.copy_(0.5 * noise)
            elif p.ndim == 1:
                p.copy_(1.0 + 0.3 * noise)
            elif "embeddings" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / p.shape[1:].numel() ** 0.5)


def compare(a, b) -> dict[str, float]:
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = a - b
    return {"rel_max": float(np.abs(diff).max() / np.abs(b).max()),
            "rel_rms": float(np.sqrt(np.mean(diff ** 2) / np.mean(b ** 2))),
            "top1": float(np.mean(a.argmax(-1) == b.argmax(-1)))}


def run_case(name: str, seq_len: int, args, directory: pathlib.Path) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from fla.models import GLAConfig, GLAForCausalLM, GSAConfig, GSAForCausalLM

    from gsa_jax.hf.fla import load_fla
    from gsa_jax.models import CausalLM
    kind, fields = CASES[name]
    cfg_cls, model_cls = (GSAConfig, GSAForCausalLM) if kind == "gsa" else \
        (GLAConfig, GLAForCausalLM)
    model = model_cls(cfg_cls(**BASE, **fields))
    randomize(torch, model, seed=len(name))
    model = model.to(torch.bfloat16).eval()
    path = directory / f"{name}_{seq_len}"
    model.save_pretrained(path)
    tokens = np.random.default_rng(seq_len).integers(0, BASE["vocab_size"],
                                                     (args.batch, seq_len))
    ids = torch.from_numpy(tokens).to(args.device)
    logits: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for label, dtype in (("fla_bf16", torch.bfloat16), ("fla_fp32", torch.float32)):
            model = model.to(args.device, dtype)
            start = time.perf_counter()
            logits[label] = model(ids, use_cache=False).logits.float().cpu().numpy()
            print(f"{name} T={seq_len} {label}: {time.perf_counter() - start:.1f} s", flush=True)
    impls = args.gsa_impls if kind == "gsa" else ["chunk"]
    for dtype, forms in (("float32", ["chunk"]), ("bfloat16", impls)):
        for impl in forms:
            config, params = load_fla(path, dtype=dtype, impl=impl)
            label = f"ours_{'fp32' if dtype == 'float32' else 'bf16'}_{impl}"
            start = time.perf_counter()
            with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):
                out = jax.jit(CausalLM(config).apply)({"params": params}, jnp.asarray(tokens))
                logits[label] = np.asarray(out, np.float32)
            print(f"{name} T={seq_len} {label}: {time.perf_counter() - start:.1f} s", flush=True)
    row: dict[str, Any] = {"case": name, "seq_len": seq_len, "fields": fields,
                           "fla_bf16_vs_fla_fp32": compare(logits["fla_bf16"],
                                                           logits["fla_fp32"])}
    row["ours_fp32_vs_fla_fp32"] = compare(logits["ours_fp32_chunk"], logits["fla_fp32"])
    ok = row["ours_fp32_vs_fla_fp32"]["rel_max"] < 1e-4
    row["bf16"] = {}
    for impl in impls:
        bf16 = compare(logits[f"ours_bf16_{impl}"], logits["fla_fp32"])
        pair = compare(logits[f"ours_bf16_{impl}"], logits["fla_bf16"])
        row["bf16"][impl] = {"ours_bf16_vs_fla_fp32": bf16, "ours_bf16_vs_fla_bf16": pair}
        ok &= bf16["rel_rms"] <= 2 * row["fla_bf16_vs_fla_fp32"]["rel_rms"] + 1e-3
    row["ok"] = bool(ok)
    return row


def markdown(rows: list[dict[str, Any]], args) -> str:
    f = lambda x: f"{x:.1e}"  # noqa: E731
    table = []
    for r in rows:
        ref = r["fla_bf16_vs_fla_fp32"]
        for impl, d in r["bf16"].items():
            table.append([r["case"], r["seq_len"], impl,
                          f(r["ours_fp32_vs_fla_fp32"]["rel_max"]),
                          f(d["ours_bf16_vs_fla_fp32"]["rel_rms"]), f(ref["rel_rms"]),
                          f(d["ours_bf16_vs_fla_bf16"]["rel_rms"]),
                          f"{100 * d['ours_bf16_vs_fla_bf16']['top1']:.1f}",
                          "yes" if r["ok"] else "NO"])
    lines = [f"# fla checkpoints in gsa-jax: logits against fla's Triton kernels ({args.tag})",
             "",
             f"Random fla models (width {BASE['hidden_size']}, {BASE['num_hidden_layers']} "
             f"layers, vocabulary {BASE['vocab_size']}, batch {args.batch}), saved in bf16 and "
             "loaded with `gsa_jax.hf.fla.load_fla`. fp32: both sides in float32 (fla's Triton "
             "dots in IEEE float32, ours at matmul precision 'highest'); bf16: each side's bf16 "
             "logits against fla's float32 ones (rms of the difference / rms of the logits), "
             "and against each other. T = 48 runs fla's fused_recurrent kernels, T = 512 its "
             "chunk kernels; `impl` is our op's form in bf16 (float32: chunk).", "",
             common.markdown_table(
                 ["case", "T", "impl", "fp32: ours vs fla (max rel)",
                  "bf16 ours vs fla fp32 (rms rel)", "bf16 fla vs fla fp32 (rms rel)",
                  "bf16 ours vs fla bf16 (rms rel)", "top-1 agree %", "ok"], table), "",
             "ok: float32 within 1e-4 of fla, and our bf16 error at most twice fla's own "
             "(+1e-3).", ""]
    verdict = all(r["ok"] for r in rows)
    lines.append(f"**Verdict: {'parity' if verdict else 'MISMATCH'}** over {len(rows)} cases.")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge_files:
        return merge(args)
    # fla's float32 reference with IEEE float32 dots (Triton uses TF32 by default); set before
    # any kernel compiles.
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
    # torch and jax share the GPU: no preallocation of 75% of it by jax.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    common.ensure_importable()
    try:
        if not args.full_autotune:
            one_config_autotune()
        import fla  # noqa: F401  (registers GSA/GLA with transformers)
        import torch
    except ImportError as err:
        print(f"fla_parity: needs torch and flash-linear-attention ({err})", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("fla_parity: torch has no CUDA device (use a GPU machine)", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            for seq_len in args.seq_lens:
                rows.append(run_case(name, seq_len, args, pathlib.Path(tmp)))
    record = {"config": {"base": BASE, "cases": {c: CASES[c] for c in args.cases},
                         "seq_lens": args.seq_lens, "batch": args.batch,
                         "device": args.device, "torch": torch.__version__,
                         "triton_autotune": "full" if args.full_autotune else "first config",
                         "fla": getattr(fla, "__version__", None)},
              "rows": rows}
    common.write_and_print(args.tag, "fla_parity", record, markdown(rows, args),
                           out_dir=args.out_dir)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

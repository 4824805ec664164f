"""The GPU kernels inside `shard_map` on a real GPU (issue 18, item 1: "check it on the GPU too").

On CPU the sharded-kernel tests run the kernels interpreted (plain HLO); here the compiled
Triton custom call runs inside the very wrapper training uses on a mesh of several devices
(`gsa_jax.ops.pallas.shard_mapped`, forced on a one-device mesh with the batch over
(data, fsdp) and the heads over tensor). Checked, for GSA forward and every gradient, with
segments and grouped heads:

- the shard-mapped kernels equal the same kernels called without a mesh (same device, same
  inputs: the wrapper must not change a bit, up to the order of float32 sums);
- both are within bf16/f32 rounding of the float32 chunk form;
- the compiled module holds the kernel's custom call and no all-gather.

Results: experiments/results/kernel_shard_check_<tag>.{json,md}. Command on the device:
`python experiments/kernel_shard_check.py --tag h200 --out-dir $OUT`; on a CPU `--interpret` runs it with the
kernels interpreted (a smoke check of the script).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402

common.ensure_importable()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gsa_jax import sharding as shd  # noqa: E402
from gsa_jax.ops import gated_slot_attention  # noqa: E402
from gsa_jax.ops import pallas as ops_pallas  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None):
    p = common.argument_parser(__doc__)
    p.add_argument("--shape", type=int, nargs=7, default=[4, 1000, 8, 4, 128, 128, 64],
                   metavar=("B", "T", "H", "HKV", "K", "V", "M"))
    p.add_argument("--interpret", action="store_true",
                   help="allow a run without a GPU, the kernels interpreted (a CPU smoke check "
                        "of the script; the point is the compiled GPU run)")
    return p.parse_args(argv)


def inputs(seed: int, B, T, H, HKV, K, V, M, dtype):
    rng = np.random.default_rng(seed)
    n = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    q, k, v, s = n(B, T, H, K), n(B, T, HKV, K) / np.sqrt(K), n(B, T, HKV, V), n(B, T, HKV, M)
    g = np.log(rng.uniform(0.9, 0.999, (B, T, HKV, M))).astype(np.float32)  # layer-like decay
    hk0, hv0 = n(B, HKV, K, M) * 0.1, n(B, HKV, M, V) * 0.1
    seg = np.cumsum(rng.uniform(size=(B, T)) < 3.0 / T, axis=1).astype(np.int32)
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    x = (cast(q), cast(k), cast(v), cast(s), jnp.asarray(g), jnp.asarray(hk0), jnp.asarray(hv0))
    cot = (n(B, T, H, V), (n(B, HKV, K, M), n(B, HKV, M, V)))
    return x, jax.tree.map(jnp.asarray, cot), jnp.asarray(seg)


def loss_and_grads(impl: str):
    """jit of (x, cot, seg) -> ((o, (hk, hv)), grads of every input); pallas is interpreted
    unless jax runs on a GPU (ops.pallas decides)."""
    def run(x, cot, seg):
        def fn(*x):
            return gated_slot_attention(*x[:5], initial_state=x[5:], return_final_state=True,
                                        segment_ids=seg, impl=impl, chunk_size=64)
        out, vjp = jax.vjp(fn, *x)
        return out, vjp((cot[0].astype(out[0].dtype), cot[1]))
    return jax.jit(run)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def shard_map_always(fn, B, Hkv, with_runs):
    """per_shard's replacement here: its shard_map for every call (a one-device mesh would
    skip it)."""
    return ops_pallas.shard_mapped(fn, ops_pallas.BATCH_AXES, ops_pallas.HEAD_AXIS, with_runs)


def check(args, dtype) -> dict[str, Any]:
    B, T, H, HKV, K, V, M = args.shape
    x, cot, seg = inputs(7, B, T, H, HKV, K, V, M, dtype)
    names = ["o", "hk", "hv", "dq", "dk", "dv", "ds", "dg", "dhk0", "dhv0"]
    flat = lambda r: jax.tree.leaves(r)  # noqa: E731  (o, (hk, hv)), grads in arg order

    plain = flat(loss_and_grads("pallas")(x, cot, seg))
    ref = flat(loss_and_grads("chunk")(
        jax.tree.map(lambda a: a.astype(jnp.float32), x), cot, seg))
    mesh = shd.make_mesh(shd.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    original = ops_pallas.per_shard
    ops_pallas.per_shard = shard_map_always
    try:
        with jax.set_mesh(mesh):
            fn = loss_and_grads("pallas")
            hlo = fn.lower(x, cot, seg).compile().as_text()
            shard_maps = str(jax.make_jaxpr(fn)(x, cot, seg)).count("shard_map")
            sharded = flat(fn(x, cot, seg))
    finally:
        ops_pallas.per_shard = original
    row = {"dtype": jnp.dtype(dtype).name,
           "sharded_vs_plain": {n: rel(a, b) for n, a, b in zip(names, sharded, plain)},
           "sharded_vs_chunk_f32": {n: rel(a, b) for n, a, b in zip(names, sharded, ref)},
           "all_gathers": hlo.count("all-gather"),
           "kernel_custom_calls": hlo.count("custom-call") if not args.interpret else None,
           "shard_maps_in_jaxpr": shard_maps}
    bound = 1e-5 if dtype == jnp.float32 else 1e-3
    tol = 2e-3 if dtype == jnp.float32 else 3e-2
    row["ok"] = bool(max(row["sharded_vs_plain"].values()) <= bound
                     and max(row["sharded_vs_chunk_f32"].values()) <= tol
                     and row["all_gathers"] == 0 and shard_maps >= 2
                     and (args.interpret or row["kernel_custom_calls"] > 0))
    row["bounds"] = {"sharded_vs_plain": bound, "sharded_vs_chunk_f32": tol}
    return row


def markdown(record) -> str:
    names = list(record["rows"][0]["sharded_vs_plain"])
    table = [[r["dtype"], which] + [f"{r[which][n]:.1e}" for n in names]
             for r in record["rows"] for which in ("sharded_vs_plain", "sharded_vs_chunk_f32")]
    lines = [f"# GPU kernels inside shard_map ({record['tag']})", "",
             f"GSA, B,T,H,Hkv,K,V,M = {tuple(record['shape'])}, chunk 64, segments, initial "
             "states; max |difference| / max |reference| per output and gradient. "
             "`sharded`: the kernels inside `ops.pallas.shard_mapped` (training's wrapper) on a "
             "one-device mesh; `plain`: the same kernels without a mesh; `chunk_f32`: the XLA "
             "chunk form in float32.", "",
             common.markdown_table(["dtype", "comparison"] + names, table), ""]
    for r in record["rows"]:
        lines.append(f"- {r['dtype']}: all-gathers in the compiled module: {r['all_gathers']}; "
                     f"custom calls: {r['kernel_custom_calls']}; shard_maps in the program: "
                     f"{r['shard_maps_in_jaxpr']}; bounds {r['bounds']}; "
                     f"**{'ok' if r['ok'] else 'FAILED'}**")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    args.tag = args.tag or jax.default_backend()
    if not args.interpret and jax.default_backend() != "gpu":
        print("kernel_shard_check: needs a GPU (or --interpret for a CPU smoke check)",
              file=sys.stderr)
        return 2
    rows = [check(args, d) for d in (jnp.float32, jnp.bfloat16)]
    record = {"tag": args.tag, "shape": args.shape, "interpret": args.interpret, "rows": rows,
              "command": common.command_line(argv), "environment": common.environment()}
    common.write_and_print(args.tag, "kernel_shard_check", record, markdown(record),
                           out_dir=args.out_dir)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

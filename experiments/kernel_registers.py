"""Registers, spills, shared memory and instruction counts of the GPU kernels, read on a CPU.

Each Pallas GPU kernel of one `gsa_pallas` forward (or forward+backward) at a given shape and
launch tuning is lowered to Triton IR here (the very module XLA would compile on the GPU: Pallas'
lowering needs no GPU), then compiled by the pip `triton` package for sm_90 with the launch's
num_warps / num_stages, and its PTX assembled by the `ptxas` Triton ships (`-v`): registers per
thread, spill stores / loads and stack frame per thread, shared memory. A spill is local
memory traffic inside the kernel's loop, so a launch that spills is a candidate for more warps,
a smaller block or fewer pipeline stages; the times stay the GPU's to measure (bench_kernels).
The assembled kernel is also disassembled (the `nvdisasm` Triton ships) and its SASS counted
per chunk by class (`sass_mix`): one program per SM cannot hide latency, so a walk's time per
chunk follows the instructions its threads issue (on the H200, pass 2's fused walk: ~2200 per
chunk at Nsight's 0.47 issues per cycle per scheduler, ~4.7 µs predicted, 4.8 measured).

Caveats: XLA compiles the IR with its own Triton (jaxlib's), not the pip package, so its register
allocation may differ somewhat; use the same triton as the device (3.6.0 there, 2026-11) for the
closest reading. `--fast-only` compiles each kernel with only the fast intra-chunk path (the
sub-chunk tier and the exact loop cut out; such a kernel is for reading only): what mild gates
run, without the cold branches' own spills.

    python experiments/kernel_registers.py --tag cpu --shape 8 2048 16 128 64 128 \\
        --variant 'default={}' --variant 'seq8={"warps_seq": 8}' [--fast-only] [--forward-only]

Needs `pip install triton==3.6.0` (Linux x86_64; the compile runs in a subprocess, away from
jaxlib's own MLIR).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments import common  # noqa: E402

TRITON_CALL = "__gpu$xla.gpu.triton"


@contextlib.contextmanager
def captured_modules():
    """Collects the Triton IR text of every Pallas GPU kernel lowered inside."""
    from jax._src.pallas.triton import lowering
    from jax._src.pallas.triton import pallas_call_registration as registration
    texts, original = [], lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = original(*args, **kwargs)
        texts.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    registration.lowering.lower_jaxpr_to_triton_module = capture
    try:
        yield texts
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = original


@contextlib.contextmanager
def fast_path_only(enabled: bool):
    """With `enabled`, every intra-chunk branch takes the fast path (for reading only)."""
    from pallas_kernels import chunk_math
    original = chunk_math._strong_gate_path
    if enabled:
        chunk_math._strong_gate_path = lambda fast, sub_tier, exact, gt, sub, C: fast
    try:
        yield
    finally:
        chunk_math._strong_gate_path = original


def launch_params(module_text: str) -> dict:
    """{kernel name: (num_warps, num_stages)} of the Triton calls of an exported module."""
    params = {}
    for call in module_text.split(TRITON_CALL)[1:]:
        call = re.sub(r'ir = "[^"]*"', "ir", call)
        m = re.search(r'name = "(\w+)", num_stages = (\d+) : i32, num_warps = (\d+)', call)
        params.setdefault(m.group(1), (int(m.group(3)), int(m.group(2))))
    return params


def lower_kernels(shape, tuning: dict, *, forward_only: bool, fast_only: bool, dtype=jnp.bfloat16):
    """[(kernel name, num_warps, num_stages, TTIR text)] of one GSA forward (+ backward)."""
    from gsa_jax.ops import common as ops_common
    from gsa_jax.ops import pallas as ops_pallas
    from pallas_kernels import gla as pgla

    B, T, H, K, M, V = shape
    sd = jax.ShapeDtypeStruct
    args = tuple(sd((B, T, H, d), dtype) for d in (K, K, V, M, M))
    act = functools.partial(ops_common.slot_activation, kind="softmax")

    def gsa(q, k, v, s, g):
        hk0 = jnp.zeros((B, H, K, M), jnp.float32)
        hv0 = jnp.zeros((B, H, M, V), jnp.float32)
        o, hk, hv = ops_pallas.gsa_pallas(q, k, v, s, g, hk0, hv0, None, scale=K ** -0.5,
                                          chunk_size=64, slot_activation_fn=act,
                                          interpret=False)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(hk) + jnp.sum(hv)

    fn = gsa if forward_only else jax.grad(gsa, argnums=(0, 1, 2, 3, 4))
    with pgla.tuning(**tuning), fast_path_only(fast_only), captured_modules() as texts:
        module = jax.export.export(
            jax.jit(lambda *a: fn(*a)), platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
        )(*args).mlir_module()
    params = launch_params(module)
    kernels = []
    for text in texts:
        name = re.search(r"tt.func public @(\w+)", text).group(1)
        if name in params:   # a kernel lowered but dead in the module is not launched
            kernels.append((name, *params[name], text))
    return kernels


_COMPILE = r"""
import json, os, re, subprocess, sys
import triton
from triton.backends.compiler import GPUTarget
jobs = json.load(sys.stdin)
bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# the ptxas that reads the PTX version this triton writes (3.9 writes a version its plain
# ptxas refuses and assembles with ptxas-blackwell, also for sm_90)
candidates = [os.path.join(bin_dir, name) for name in ("ptxas", "ptxas-blackwell")]
out = []
for path, warps, stages in jobs:
    k = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "num_stages": stages})
    ptx = path[:-5] + ".ptx"
    open(ptx, "w").write(k.asm["ptx"])
    cubin = path[:-5] + ".cubin"
    for ptxas in candidates:  # one run gives the statistics (-v) and the cubin to disassemble
        run = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", cubin],
                             capture_output=True, text=True)
        if run.returncode == 0:
            break
    else:
        raise RuntimeError(run.stderr)
    info = run.stderr
    sass = subprocess.run([os.path.join(bin_dir, "nvdisasm"), "-c", cubin], check=True,
                          capture_output=True, text=True).stdout
    num = lambda pattern: int(re.search(pattern, info).group(1))
    out.append({"registers": num(r"Used (\d+) registers"),
                "spill_stores": num(r"(\d+) bytes spill stores"),
                "spill_loads": num(r"(\d+) bytes spill loads"),
                "stack_frame": num(r"(\d+) bytes stack frame"),
                "shared_bytes": k.metadata.shared, "sass": sass})
json.dump({"triton": triton.__version__, "kernels": out}, sys.stdout)
"""


# SASS opcodes by what they do (sm_90); the rest counts as "other"
SASS_CLASSES = {
    "fp32": ("FADD", "FFMA", "FMUL", "FMNMX", "FSEL", "FSETP", "FRND", "FCHK"),
    "mufu": ("MUFU",),
    "tensor": ("HGMMA", "HMMA", "IMMA"),
    "smem_sync": ("LDS", "STS", "LDSM", "STSM", "BAR", "SHFL", "LDGSTS", "LDGDEPBAR",
                  "DEPBAR", "WARPSYNC", "MEMBAR", "REDUX"),
    "int_addr": ("IADD3", "LOP3", "SHF", "LEA", "IMAD", "ISETP", "SEL", "PRMT", "VIADD",
                 "UIADD3", "R2UR", "UMOV", "MOV", "S2R", "S2UR", "PLOP3", "F2I", "I2F", "ULDC",
                 "UISETP", "USEL", "ULOP3", "CS2R", "SGXT", "ULEA", "USHF", "P2R", "R2P",
                 "IABS", "IMNMX", "UIMAD", "USGXT", "FLO", "POPC"),
    "convert": ("F2FP", "F2F"),
    "global": ("LDG", "STG", "ATOMG", "RED"),
    "local": ("LDL", "STL"),
}
_SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z0-9_]+)")
_SASS_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_SASS_TARGET = re.compile(r"BRA\s.*`\((\.L_x_\d+)\)")


# the kernels that walk chunks in a loop (one pass of it per chunk); the others compute one
# chunk per program, so their whole kernel is a chunk's work
WALKS = ("gla_states_fwd", "gla_final_state_fwd", "gla_fused_fwd", "gla_dstates_bwd",
         "gla_final_dstate_bwd")


def sass_mix(sass: str) -> dict:
    """Instruction counts of a kernel's SASS (nvdisasm -c), whole and by class
    (SASS_CLASSES), and of its main loop (the longest span a backward branch closes: a walk's
    chunk loop). Per thread, each instruction once (static counts: a walk's loop body runs
    once per chunk, so its count is one thread's issue work per chunk; cold branches count
    too)."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) for m in [_SASS_LABEL.match(line)]
              if m}
    loop = (0, 0)
    for i, line in enumerate(lines):
        m = _SASS_TARGET.search(line)
        if m and labels.get(m.group(1), i) < i and i - labels[m.group(1)] > loop[1] - loop[0]:
            loop = (labels[m.group(1)], i)

    def opcodes(part):
        return [m.group(1) for line in part for m in [_SASS_LINE.match(line)] if m]

    def by_class(ops):
        counts = {name: sum(op in names for op in ops) for name, names in SASS_CLASSES.items()}
        counts["other"] = len(ops) - sum(counts.values())
        return counts

    whole = opcodes(lines)
    in_loop = opcodes(lines[loop[0]:loop[1] + 1]) if loop[1] else []
    return {"instructions": len(whole), "by_class": by_class(whole),
            "loop_instructions": len(in_loop), "loop_by_class": by_class(in_loop),
            "loads": global_loads(whole)}


# global-memory loads that go to shared memory without holding the issuing warp (cp.async,
# TMA: what Triton's software pipeliner emits for a loop's loads, num_stages > 1) or through
# registers (LDG: the warp waits where the value is first used)
ASYNC_LOADS = ("LDGSTS", "UTMALDG")


def global_loads(ops) -> dict:
    """Counts of a kernel's global loads by kind: {"async": cp.async / TMA, "plain": LDG}.
    A chunk-parallel kernel without a loop has only plain ones (nothing to overlap them
    with); Tuning.chunks_per_program's loop gives the pipeliner async ones."""
    return {"async": sum(op in ASYNC_LOADS for op in ops), "plain": ops.count("LDG")}


def compile_stats(kernels, workdir: str) -> tuple[str, list[dict]]:
    """ptxas statistics of each (name, warps, stages, ttir) (a subprocess with pip triton)."""
    jobs = []
    for i, (name, warps, stages, text) in enumerate(kernels):
        path = os.path.join(workdir, f"{i:02d}_{name}.ttir")
        with open(path, "w") as f:
            f.write(text)
        jobs.append((path, warps, stages))
    run = subprocess.run([sys.executable, "-c", _COMPILE], input=json.dumps(jobs),
                         capture_output=True, text=True)
    if run.returncode:
        raise SystemExit("kernel_registers: compiling with pip triton failed (pip install "
                         f"triton==3.6.0):\n{run.stderr[-3000:]}")
    result = json.loads(run.stdout)
    stats = [{**{k: v for k, v in st.items() if k != "sass"}, **sass_mix(st["sass"])}
             for st in result["kernels"]]
    return result["triton"], stats


def parse_args(argv=None):
    p = common.argument_parser(__doc__)
    p.add_argument("--shape", type=int, nargs=6, action="append",
                   metavar=("B", "T", "H", "K", "M", "V"),
                   help="repeatable; default 8 2048 16 128 64 128 and 8 2048 16 128 128 128")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=JSON of Tuning changes (repeatable; default: 'default={}')")
    p.add_argument("--forward-only", action="store_true", help="the forward without gradient")
    p.add_argument("--fast-only", action="store_true",
                   help="the fast intra-chunk path only (cold branches cut out; for reading)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    shapes = args.shape or [[8, 2048, 16, 128, 64, 128], [8, 2048, 16, 128, 128, 128]]
    variants = {}
    for text in args.variant or ["default={}"]:
        name, _, changes = text.partition("=")
        variants[name] = json.loads(changes or "{}")
    rows, triton_version = [], None
    with tempfile.TemporaryDirectory() as workdir:
        for shape in shapes:
            for name, tuning in variants.items():
                kernels = lower_kernels(shape, tuning, forward_only=args.forward_only,
                                        fast_only=args.fast_only)
                triton_version, stats = compile_stats(kernels, workdir)
                for launch, ((kernel, warps, stages, _), st) in enumerate(zip(kernels, stats)):
                    rows.append({"shape": list(shape), "variant": name, "launch": launch,
                                 "kernel": kernel, "num_warps": warps, "num_stages": stages,
                                 **st})
                    print(json.dumps(rows[-1]), flush=True)
    record = {"rows": rows, "variants": variants, "triton": triton_version,
              "forward_only": args.forward_only, "fast_only": args.fast_only}
    what = ("forward without gradient" if args.forward_only else "forward + backward")
    if args.fast_only:
        what += ", fast intra-chunk path only (cold branches cut out)"
    def mix(r):
        """A chunk's instructions: a walk's loop body, a chunk-parallel kernel's whole code."""
        walk = r["kernel"] in WALKS
        n, c = ((r["loop_instructions"], r["loop_by_class"]) if walk
                else (r["instructions"], r["by_class"]))
        return (f"{n} | {c['fp32']} / {c['mufu']} / {c['tensor']} / {c['smem_sync']} / "
                f"{c['int_addr']}")

    table = common.markdown_table(
        ["B,T,H,K,M,V", "variant", "#", "kernel", "warps", "stages", "registers",
         "spill st / ld (B)", "shared KiB", "SASS per chunk",
         "fp32 / MUFU / MMA / smem+sync / int", "loads async / plain"],
        [(",".join(map(str, r["shape"])), r["variant"], r["launch"], r["kernel"],
          r["num_warps"], r["num_stages"], r["registers"],
          f"{r['spill_stores']} / {r['spill_loads']}", f"{r['shared_bytes'] / 1024:.0f}",
          mix(r), f"{r['loads']['async']} / {r['loads']['plain']}") for r in rows],
        align="llrlrrrrrrrr")
    markdown = (f"# Kernel registers and spills ({args.tag})\n\n"
                f"The Pallas GPU kernels of one GSA {what}, bf16, chunk 64: their Triton IR "
                f"compiled by pip triton {triton_version} for sm_90 and assembled by its ptxas "
                "(experiments/kernel_registers.py). Per thread: registers and spilled bytes "
                "(stores / loads); per program: shared memory. 'SASS per chunk': the "
                "instructions one thread issues for a chunk (nvdisasm of the assembled kernel, "
                "static counts: a walk's loop body; a chunk-parallel kernel's whole code, "
                "cold branches included), by class: float32 arithmetic, MUFU (exp, "
                "reciprocal), tensor-core, shared memory and synchronisation, integer and "
                "addressing. A walk whose warps cannot hide latency is bound by this count "
                "(issue slots), not by its matmuls. 'loads async / plain': the kernel's "
                "global loads issued as cp.async or TMA copies into shared memory (Triton's "
                "software pipelining of a loop: the next iteration's tiles load under this "
                "one's work) and as LDG (the warp waits for them). "
                "XLA compiles the same IR with "
                "its own Triton on the GPU, so its allocation may differ somewhat; the times "
                "are the GPU's to measure. # is the launch order: GSA's pass 1 (q, k, s; gated "
                "on its value axis, the slots) then pass 2 (p, s, v; gated on its key axis, the "
                "slots), "
                "and the backward in reverse: pass 2's kernels first, then pass 1's.\n\n"
                + table + "\n")
    common.write_and_print(args.tag or "cpu", "kernel_registers", record, markdown,
                           out_dir=args.out_dir)


if __name__ == "__main__":
    main()

"""Time the pure-JAX chunk form against its version before issue 15, at one shape, and check
that the two agree: a quick GPU check beside experiments/bench_kernels.py.

    python experiments/chunk_speed.py                     # B=8 T=2048 H=16 K=V=128 M=64, bf16
    python experiments/chunk_speed.py --forms new          # the current form only
    python experiments/chunk_speed.py --shape 1 64 2 16 8 --repeats 2 --rounds 1   # CPU smoke

For each form ("new": gated_slot_attention(impl="chunk"); "before": the same op with the chunk
form of experiments/chunk_form_before.py), on the inputs of bench_kernels (layer-like gates):
median ms of the jitted forward and forward+backward (the gradient of Σ o·c w.r.t. q, k, v, s, g)
and XLA's compiled footprint of forward+backward. Then the relative (Frobenius) difference of
o and of the five gradients between the forms, which must be at rounding level. One JSON line
per result; run from the repository root (PYTHONPATH=.).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from experiments import chunk_form_before  # noqa: E402
from experiments.bench_kernels import (MAIN, gsa_fn, loss_grad, make_inputs, rel_err,  # noqa: E402
                                       time_jax)
from gsa_jax.ops import gla  # noqa: E402

FORMS = ("new", "before")


def _before_form(q, k, v, g, *, initial_state, **kwargs):
    # The old form expects inputs in the compute dtype, as the op used to pass them.
    q, k, v, g = (x.astype(initial_state.dtype) for x in (q, k, v, g))
    return chunk_form_before.gla_chunk(q, k, v, g, initial_state=initial_state, **kwargs)


@contextlib.contextmanager
def chunk_form(form):
    """The op's chunk form swapped for the `form` one while tracing inside."""
    saved = gla._FORMS["chunk"]
    if form == "before":
        gla._FORMS["chunk"] = _before_form
    try:
        yield
    finally:
        gla._FORMS["chunk"] = saved


def compile_form(form, fn, args):
    """Compiled executable of `fn` traced with the `form` chunk form; compile seconds."""
    t0 = time.perf_counter()
    with chunk_form(form):
        compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def footprint(compiled):
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=5, default=list(MAIN), metavar=("B", "T", "H",
                    "K", "M"), help="B T H K=V M (default: bench_kernels' shape 0)")
    ap.add_argument("--dtype", default="bfloat16", help="input dtype (default bfloat16)")
    ap.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    ap.add_argument("--repeats", type=int, default=20, help="calls per timing round")
    ap.add_argument("--rounds", type=int, default=7, help="timing rounds (the median is kept)")
    args = ap.parse_args(argv)
    shape = tuple(args.shape)
    inputs = make_inputs(shape, jnp.dtype(args.dtype))
    cot = jax.random.normal(jax.random.PRNGKey(3), shape[:3] + (shape[3],), jnp.float32)
    outputs = {}
    for form in args.forms:
        row = {"form": form, "shape": shape, "dtype": args.dtype,
               "device": jax.devices()[0].device_kind}
        # New closures per form: jax caches traces by function, and the form is chosen while
        # tracing.
        f, row["compile_fwd_s"] = compile_form(form, gsa_fn("chunk"), inputs)
        fb, row["compile_fwd_bwd_s"] = compile_form(form, loss_grad(gsa_fn("chunk"), cot),
                                                    inputs)
        row["fwd_ms"] = time_jax(f, inputs, args.repeats, args.rounds) * 1e3
        row["fwd_bwd_ms"] = time_jax(fb, inputs, args.repeats, args.rounds) * 1e3
        row["fwd_bwd_compiled_GiB"] = (footprint(fb) or 0) / 2 ** 30
        outputs[form] = (f(*inputs), fb(*inputs))
        print(json.dumps(row), flush=True)
    if len(outputs) == 2:
        (o_new, g_new), (o_old, g_old) = outputs["new"], outputs["before"]
        diff = {"o": rel_err(o_new, o_old)}
        diff.update({f"d{n}": rel_err(a, b) for n, a, b in zip("qkvsg", g_new, g_old)})
        print(json.dumps({"relative_difference_new_vs_before": diff}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

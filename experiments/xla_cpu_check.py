"""Does this jaxlib's CPU compiler miscompile the chunk form? (see gsa_jax/_xla_cpu.py)

    JAX_PLATFORMS=cpu python experiments/xla_cpu_check.py            # ~30 s

Compiles GSA's two chunk-form passes in one jit at a single chunk per sequence (B = 4, T = 32,
C = 64, float64) eight times afresh and counts the compiles whose output differs from the
recurrent form by more than 1e-10, once with XLA_FLAGS as gsa_jax leaves them and once with
gsa_jax's workaround left out (GSA_JAX_KEEP_XLA_FLAGS=1), and with the flag set by hand (does
this jaxlib know it?), each in its own process. On jaxlib 0.10.2: 22 of 24 bad without the
workaround, 0 of 24 with it. Prints one JSON line per setting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

COMPILES = 8


def count_bad() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    jax.config.update("jax_enable_x64", True)
    from gsa_jax.ops import gated_slot_attention
    B, T, H, K, V, M, C = 4, 32, 2, 16, 16, 64, 64
    rng = np.random.default_rng(0)
    x = [jnp.asarray(rng.standard_normal((B, T, H, d))) for d in (K, K, V, M)]
    g = jnp.asarray(-np.exp(rng.standard_normal((B, T, H, M)) - 2))
    ref = gated_slot_attention(*x, g, impl="recurrent")[0]
    errors = []
    for _ in range(COMPILES):
        jax.clear_caches()
        o = jax.jit(lambda *a: gated_slot_attention(*a, impl="chunk", chunk_size=C)[0])(*x, g)
        errors.append(float(jnp.max(jnp.abs(o - ref))))
    import jaxlib
    return {"jaxlib": jaxlib.__version__, "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            "bad_compiles": sum(not e <= 1e-10 for e in errors), "compiles": COMPILES,
            "max_error": max(errors)}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(count_bad()), flush=True)
        return 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    flags = os.environ.get("XLA_FLAGS", "")
    settings = {  # name: (GSA_JAX_KEEP_XLA_FLAGS, XLA_FLAGS)
        "as gsa_jax sets them": ("0", flags),
        "workaround left out": ("1", flags),
        "the flag by hand": ("1", f"{flags} --xla_cpu_experimental_ynn_fusion_type=".strip()),
    }
    for name, (keep, xla_flags) in settings.items():
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "GSA_JAX_KEEP_XLA_FLAGS": keep,
               "XLA_FLAGS": xla_flags,
               "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
        out = subprocess.run([sys.executable, __file__, "--child"], env=env, text=True,
                             capture_output=True)
        result = (json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0
                  else {"error": out.stderr[-400:]})
        print(json.dumps({"setting": name, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

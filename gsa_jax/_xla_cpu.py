"""A workaround for a CPU miscompilation in jaxlib 0.10: its YNN fusions.

On jaxlib 0.10.2 (CPU), some jitted programs of the chunk form read memory they never wrote:
GSA's two passes in one `jit` with a single chunk per sequence (T <= C, B > 1) give values of
1e+250, -inf or NaN in 22 of 24 fresh compiles and the right values in the others (it varies
from compile to compile; a compiled program repeats its result). The same program is right
eagerly and with each pass jitted alone, and with XLA's YNN fusions off it was right in 24 of
24 compiles (experiments/xla_cpu_check.py; tests/test_ops_forms.py::
test_single_chunk_both_passes_in_one_jit). Training on a CPU was hit through evaluation: two
runs of one configuration reported different validation losses.

XLA reads XLA_FLAGS when it creates its first backend, so this must run before any array is
made; `gsa_jax` calls it on import. Only jaxlib 0.10.x gets the flag: other versions may not
know it, and XLA stops the process on an unknown flag.
"""

from __future__ import annotations

import os
import warnings

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
AFFECTED_JAXLIB = ("0.10.",)


def _jaxlib_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("jaxlib")
    except PackageNotFoundError:
        return ""


def disable_ynn_fusions_if_affected() -> bool:
    """Adds YNN_FLAG to XLA_FLAGS on an affected jaxlib (unless the user set that flag); warns
    when the backends already exist, since the flag can then no longer apply. Returns whether
    the flag is in force. GSA_JAX_KEEP_XLA_FLAGS=1 leaves XLA_FLAGS alone."""
    if os.environ.get("GSA_JAX_KEEP_XLA_FLAGS") == "1":
        return False
    if not _jaxlib_version().startswith(AFFECTED_JAXLIB):
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return True
    try:
        from jax._src import xla_bridge
        started = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):
        started = False
    if started:
        warnings.warn(f"gsa_jax was imported after JAX created its backends: on a CPU with "
                      f"jaxlib {_jaxlib_version()} the chunk form can be miscompiled; set "
                      f"XLA_FLAGS={YNN_FLAG} before starting Python (see gsa_jax/_xla_cpu.py)",
                      RuntimeWarning, stacklevel=3)
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {YNN_FLAG}".strip()
    return True

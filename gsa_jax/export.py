"""`gsa-jax export`: a GSA or GLA training run's checkpoint written as a flash-linear-attention
model directory (config.json + safetensors, gsa_jax.hf.fla.save_fla), which fla's
`AutoModelForCausalLM.from_pretrained` loads (after `import fla`) with the same logits.

    gsa-jax export --run-dir runs/gsa-340m --output exported/gsa-340m [--step N]
                   [--dtype bfloat16] [--max-shard-gb 5]
"""

from __future__ import annotations

import pathlib
from typing import Any, Optional


def export_run(run_dir: str | pathlib.Path, output: str | pathlib.Path, *,
               step: Optional[int] = None, dtype: str = "float32",
               max_shard_bytes: Optional[int] = None) -> dict[str, Any]:
    """Writes the run's checkpoint (latest or `step`) into the new directory `output` in fla's
    format. Returns {"directory", "files", "parameters", "notes", "step"}; ValueError for models
    fla cannot express (naming the field) or a non-empty `output`."""
    from gsa_jax.convert import restore_run
    from gsa_jax.hf.fla import save_fla
    config, params, restored = restore_run(run_dir, step)
    result = save_fla(output, config, params, dtype=dtype, max_shard_bytes=max_shard_bytes)
    return {**result, "step": restored}

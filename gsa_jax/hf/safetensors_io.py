"""Reading Hugging Face checkpoint tensors from a local directory with `safetensors` (NumPy API).

Two layouts, as `transformers`' `save_pretrained` writes them:

    model.safetensors                                  one file
    model.safetensors.index.json + model-0000i-of-0000n.safetensors   sharded ("weight_map":
                                                       tensor name -> shard file)

Tensors are read one at a time (a 7B checkpoint need not fit in memory twice). bfloat16 tensors
come back as `ml_dtypes.bfloat16` arrays (NumPy has no bfloat16 of its own).
"""

from __future__ import annotations

import json
import pathlib
from typing import Iterator

import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _safe_open():
    try:
        # Registers bfloat16 with NumPy: safetensors' NumPy API looks dtypes up by name, and
        # without this it fails on bf16 checkpoints ("data type 'bfloat16' not understood").
        import ml_dtypes  # noqa: F401  (a jax dependency, always present)
        from safetensors import safe_open
    except ImportError as err:  # optional dependency
        raise ImportError("reading Hugging Face checkpoints needs the `safetensors` package: "
                          "pip install 'gsa-jax[hf]' (or pip install safetensors)") from err
    return safe_open


class TensorReader:
    """Names and lazily read tensors of a checkpoint directory.

    Usage: `with TensorReader(path) as reader: w = reader.get("model.norm.weight")`.
    Raises FileNotFoundError when the directory holds neither layout, ValueError when the
    index names a shard that is missing.
    """

    def __init__(self, directory: str | pathlib.Path):
        self.directory = pathlib.Path(directory)
        safe_open = _safe_open()
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index}: no 'weight_map' (tensor name -> shard file)")
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.directory / f).is_file()]
            if missing:
                raise ValueError(f"{index} names shard file(s) that are missing: {missing}")
        elif single.is_file():
            files = [SINGLE_FILE]
        else:
            found = sorted(p.name for p in self.directory.glob("*")) if self.directory.is_dir() \
                else None
            raise FileNotFoundError(
                f"no {SINGLE_FILE} or {INDEX_FILE} in {str(self.directory)!r} (found: {found}); "
                f"only safetensors checkpoints are read (convert .bin files with transformers' "
                f"save_pretrained(..., safe_serialization=True))")
        self._handles = {f: safe_open(str(self.directory / f), framework="np") for f in files}
        # The shard's own header is the truth (the index could be stale).
        self._where = {name: f for f, h in self._handles.items() for name in h.keys()}

    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        """The tensor `name` as stored (dtype and shape of the file)."""
        if name not in self._where:
            raise ValueError(f"checkpoint {str(self.directory)!r} has no tensor {name!r}")
        return self._handles[self._where[name]].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Token files: a flat array of token ids, the nanoGPT / flash-linear-attention format.

    name.bin   raw little-endian uint16 (vocab <= 65536) or uint32 ids, read as np.memmap
    name.npy   the same as a NumPy array file (dtype stored in the file), memory-mapped
    name.bin.json / name.npy.json   optional sidecar: {"dtype", "vocab_size", "bos_id", "tokenizer"}

Documents are concatenated, each starting with the separator id `bos_id` (nanoGPT appends EOT
after each document instead; the same stream apart from its two ends).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Optional

import numpy as np

DTYPES = ("uint16", "uint32")


def sidecar_path(path: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(str(path) + ".json")


def read_token_file(path: str | os.PathLike, dtype: Optional[str] = None) -> tuple[np.ndarray, dict]:
    """Memory-maps a token file. Returns (ids [N] uint16/uint32, sidecar metadata or {})."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file {str(path)!r} does not exist (create one with "
                                f"`gsa-jax prepare`, or use data.source=stdlib)")
    meta = {}
    if sidecar_path(path).is_file():
        try:
            meta = json.loads(sidecar_path(path).read_text())
        except ValueError as err:
            raise ValueError(f"token file sidecar {str(sidecar_path(path))!r} is not valid JSON "
                             f"({err})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"token file sidecar {str(sidecar_path(path))!r}: expected a JSON "
                             f"object, got {type(meta).__name__}")
    if path.suffix != ".npy" and path.stat().st_size == 0:
        raise ValueError(f"token file {str(path)!r} is empty (0 tokens)")
    if path.suffix == ".npy":
        ids = np.load(path, mmap_mode="r")
        if ids.ndim != 1:
            raise ValueError(f"token file {str(path)!r}: expected a 1-D array, got {ids.shape}")
    else:
        dtype = dtype or meta.get("dtype", "uint16")
        if dtype not in DTYPES:
            raise ValueError(f"token file {str(path)!r}: dtype must be one of {DTYPES}, "
                             f"got {dtype!r}")
        if path.stat().st_size % np.dtype(dtype).itemsize:
            raise ValueError(f"token file {str(path)!r}: size {path.stat().st_size} bytes is not "
                             f"a multiple of {dtype}; wrong dtype?")
        ids = np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r")
    if ids.dtype.kind != "u":
        raise ValueError(f"token file {str(path)!r}: ids must be unsigned ints, got {ids.dtype}")
    if ids.size == 0:
        raise ValueError(f"token file {str(path)!r} is empty (0 tokens)")
    return ids, meta


def max_token_id(ids: np.ndarray, block: int = 1 << 24) -> int:
    """The largest id of a (memory-mapped) token array, read block by block: one pass over the
    file at disk speed, without holding it in memory."""
    return max(int(ids[i:i + block].max()) for i in range(0, len(ids), block))


def write_token_file(path: str | os.PathLike, ids: np.ndarray, *, vocab_size: int,
                     bos_id: Optional[int], tokenizer: Optional[str] = None) -> dict:
    """Writes ids (any int array) as .bin (or .npy) plus the JSON sidecar; returns the metadata."""
    path = pathlib.Path(path)
    dtype = "uint16" if vocab_size <= 2 ** 16 else "uint32"
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"ids outside [0, {vocab_size})")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = ids.astype(np.dtype(dtype).newbyteorder("<"))
    # Write then rename, so a killed `prepare` never leaves a truncated file under the final name.
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".npy":
        with open(tmp, "wb") as f:
            np.save(f, data)
    else:
        data.tofile(tmp)
    os.replace(tmp, path)
    meta = {"dtype": dtype, "vocab_size": int(vocab_size), "num_tokens": int(ids.size),
            "bos_id": None if bos_id is None else int(bos_id), "tokenizer": tokenizer}
    sidecar_path(path).write_text(json.dumps(meta, indent=1) + "\n")
    return meta

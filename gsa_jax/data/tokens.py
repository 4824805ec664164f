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


def read_sidecar(path: str | os.PathLike) -> dict:
    """The sidecar metadata of a token file ({} without a sidecar); the tokens are not read."""
    side = sidecar_path(path)
    if not side.is_file():
        return {}
    try:
        meta = json.loads(side.read_text())
    except ValueError as err:
        raise ValueError(f"token file sidecar {str(side)!r} is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"token file sidecar {str(side)!r}: expected a JSON object, got "
                         f"{type(meta).__name__}")
    return meta


def read_token_file(path: str | os.PathLike, dtype: Optional[str] = None) -> tuple[np.ndarray, dict]:
    """Memory-maps a token file. Returns (ids [N] uint16/uint32, sidecar metadata or {})."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file {str(path)!r} does not exist (create one with "
                                f"`gsa-jax prepare`, or use data.source=stdlib)")
    meta = read_sidecar(path)
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


def token_dtype(vocab_size: int) -> str:
    """The smallest dtype of DTYPES that holds ids [0, vocab_size)."""
    return "uint16" if vocab_size <= 2 ** 16 else "uint32"


class TokenWriter:
    """Writes a token file incrementally: `write(ids)` appends (any int array, checked against
    the vocabulary), `append_raw(f)` appends the bytes of a file already in this dtype,
    `close(**meta)` renames the finished file into place and writes the sidecar; `abort()`
    removes the partial file. Memory is the size of one write, whatever the file's length.

    The file is written under `<name>.tmp` and renamed at the end, so a killed writer never
    leaves a truncated file under the final name. A .npy file starts with a header reserved
    for any length and rewritten with the real one at the end.
    """

    _NPY_HEADER = 128  # bytes: magic, version, length, the header dict padded (a multiple of 64)

    def __init__(self, path: str | os.PathLike, vocab_size: int):
        self.path = pathlib.Path(path)
        self.vocab_size = int(vocab_size)
        self.dtype = np.dtype(token_dtype(vocab_size)).newbyteorder("<")
        self.num_tokens = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self._file = open(self.tmp, "wb")
        if self.path.suffix == ".npy":
            self._file.write(self._npy_header(0))

    def _npy_header(self, n: int) -> bytes:
        """NPY format 1.0: magic, version, header length, a dict literal padded to length."""
        header = repr({"descr": self.dtype.str, "fortran_order": False, "shape": (n,)})
        size = self._NPY_HEADER - 10
        return b"\x93NUMPY\x01\x00" + size.to_bytes(2, "little") + \
            header.ljust(size - 1).encode("latin1") + b"\n"

    def write(self, ids) -> None:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"{self.path}: ids outside [0, {self.vocab_size})")
        self._file.write(ids.astype(self.dtype, copy=False).tobytes())
        self.num_tokens += ids.size

    def append_raw(self, f, chunk: int = 1 << 20) -> None:
        """Appends the contents of the open binary file `f`, ids already in `self.dtype`."""
        while block := f.read(chunk):
            self._file.write(block)
            self.num_tokens += len(block) // self.dtype.itemsize

    def finish(self) -> None:
        """Closes the file and renames it into place (no sidecar)."""
        if self.path.suffix == ".npy":
            self._file.seek(0)
            self._file.write(self._npy_header(self.num_tokens))
        self._file.close()
        os.replace(self.tmp, self.path)

    def close(self, *, bos_id: Optional[int], tokenizer: Optional[str] = None) -> dict:
        """Finishes the file; returns its metadata (also written as the sidecar)."""
        self.finish()
        meta = {"dtype": self.dtype.name, "vocab_size": self.vocab_size,
                "num_tokens": int(self.num_tokens),
                "bos_id": None if bos_id is None else int(bos_id), "tokenizer": tokenizer}
        sidecar_path(self.path).write_text(json.dumps(meta, indent=1) + "\n")
        return meta

    def abort(self) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)


def write_token_file(path: str | os.PathLike, ids: np.ndarray, *, vocab_size: int,
                     bos_id: Optional[int], tokenizer: Optional[str] = None) -> dict:
    """Writes ids (any int array) as .bin (or .npy) plus the JSON sidecar; returns the metadata."""
    writer = TokenWriter(path, vocab_size)
    try:
        writer.write(ids)
    except BaseException:
        writer.abort()
        raise
    return writer.close(bos_id=bos_id, tokenizer=tokenizer)

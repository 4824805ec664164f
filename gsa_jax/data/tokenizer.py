"""Tokenizers: bytes (the default, no files needed) and Hugging Face `tokenizers` JSON files.

Both expose encode(str) -> list[int], encode_batch(texts) -> one id sequence per text (the
same ids as encode, computed together: the HF tokenizer's Rust code tokenizes a batch in
parallel), decode(ids) -> str, vocab_size and bos_id, the document
separator: every document starts with it, so it is also what the model predicts after the end
of a document (one id serves as BOS and EOS).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes 0..255, plus BOS/EOS = 256. vocab_size = 257."""
    vocab_size = 257
    bos_id = 256
    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # NumPy views of the UTF-8 bytes: no Python int per token.
        return [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        # Special ids (>= 256) are dropped; a multi-byte character cut by a boundary shows as �.
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file (optional dependency: pip install tokenizers)."""

    def __init__(self, path: str, bos_id: Optional[int] = None, bos_token: Optional[str] = None):
        try:
            from tokenizers import Tokenizer
        except ImportError as err:  # optional dependency
            raise ImportError("a tokenizer JSON file needs the `tokenizers` package: "
                              "pip install 'gsa-jax[data]' (or pip install tokenizers)") from err
        self.name = str(path)
        self._tok = Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        if bos_id is None:
            candidates = [bos_token] if bos_token else ["<|endoftext|>", "</s>", "<s>", "<eos>",
                                                        "<bos>", "<|end_of_text|>"]
            for token in candidates:
                bos_id = self._tok.token_to_id(token)
                if bos_id is not None:
                    break
            if bos_id is None:
                raise ValueError(f"tokenizer {path}: no document separator found among "
                                 f"{candidates}; pass its id (data.bos_id / --bos-id)")
        if not 0 <= bos_id < self.vocab_size:
            raise ValueError(f"tokenizer {path}: bos_id {bos_id} outside the vocabulary "
                             f"[0, {self.vocab_size})")
        self.bos_id = int(bos_id)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


def load_tokenizer(spec: Optional[str] = None, bos_id: Optional[int] = None):
    """None or "bytes": `ByteTokenizer`; otherwise the path of a tokenizers JSON file."""
    if spec is None or spec == "bytes":
        if bos_id not in (None, ByteTokenizer.bos_id):
            raise ValueError(f"the byte tokenizer's separator is {ByteTokenizer.bos_id}, "
                             f"got bos_id={bos_id}")
        return ByteTokenizer()
    return HFTokenizer(spec, bos_id)

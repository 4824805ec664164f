"""The tokenizer of a Hugging Face checkpoint directory (`tokenizer.json`, `tokenizers` library),
with the interface of `gsa_jax.data.tokenizer` (encode, decode, vocab_size, bos_id, name).

The document separator (`bos_id`, which our data pipeline puts before every document) is the
checkpoint's BOS token (`bos_token_id` of config.json, else `bos_token` of
tokenizer_config.json): a pretrained Llama/Mistral saw it at the start of every sequence, so
keeping it there keeps the converted model's inputs in distribution.
"""

from __future__ import annotations

import json
import pathlib
from typing import Optional

from gsa_jax.data.tokenizer import HFTokenizer


def _bos_token(directory: pathlib.Path) -> Optional[str]:
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return None
    token = json.loads(path.read_text()).get("bos_token")
    if isinstance(token, dict):  # older files: {"content": "<s>", ...}
        token = token.get("content")
    return token if isinstance(token, str) else None


def load_hf_tokenizer(directory: str | pathlib.Path,
                      bos_id: Optional[int] = None) -> HFTokenizer:
    """`HFTokenizer` of `<directory>/tokenizer.json`; bos_id None: the checkpoint's BOS token.

    Raises FileNotFoundError without tokenizer.json, ValueError when no separator is known.
    """
    directory = pathlib.Path(directory)
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {str(directory)!r} (only the `tokenizers` "
                                f"JSON format is read; save it with "
                                f"tokenizer.save_pretrained(...) from a fast tokenizer)")
    bos_token = None
    if bos_id is None:
        config = directory / "config.json"
        if config.is_file():
            value = json.loads(config.read_text()).get("bos_token_id")
            bos_id = value if isinstance(value, int) else None
        if bos_id is None:
            bos_token = _bos_token(directory)
    return HFTokenizer(str(path), bos_id=bos_id, bos_token=bos_token)

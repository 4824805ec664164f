"""Hugging Face Llama/Mistral checkpoints and tokenizers from local directories (optional
dependencies: pip install 'gsa-jax[hf]' for safetensors and tokenizers; no torch)."""

from gsa_jax.hf.llama import (load_llama, model_config_from_hf, params_from_hf, read_config,
                              tensor_map)
from gsa_jax.hf.safetensors_io import TensorReader
from gsa_jax.hf.tokenizer import load_hf_tokenizer

__all__ = ["TensorReader", "load_hf_tokenizer", "load_llama", "model_config_from_hf",
           "params_from_hf", "read_config", "tensor_map"]

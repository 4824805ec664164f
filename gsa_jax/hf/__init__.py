"""Hugging Face-format checkpoints and tokenizers from local directories: Llama/Mistral
(gsa_jax.hf.llama) and flash-linear-attention's GSA/GLA models (gsa_jax.hf.fla, read and
written). Optional dependencies: pip install 'gsa-jax[hf]' for safetensors and tokenizers; no
torch."""

from gsa_jax.hf.fla import load_fla, model_config_from_fla, save_fla
from gsa_jax.hf.llama import (load_llama, model_config_from_hf, params_from_hf, read_config,
                              tensor_map)
from gsa_jax.hf.safetensors_io import TensorReader
from gsa_jax.hf.tokenizer import load_hf_tokenizer

__all__ = ["TensorReader", "load_fla", "load_hf_tokenizer", "load_llama",
           "model_config_from_fla", "model_config_from_hf", "params_from_hf", "read_config",
           "save_fla", "tensor_map"]

"""Data: the embedded stdlib corpus, token files, packing into resumable training batches."""

from gsa_jax.data.datasets import DataConfig, Datasets, load_datasets
from gsa_jax.data.loader import PackedBatches, Permutation, gather_windows, sequential_batches
from gsa_jax.data.mqar import MQARConfig, generate as generate_mqar  # noqa: F401
from gsa_jax.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["ByteTokenizer", "DataConfig", "Datasets", "HFTokenizer", "PackedBatches",
           "Permutation", "gather_windows", "load_datasets", "load_tokenizer",
           "sequential_batches"]

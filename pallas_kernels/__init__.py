"""Pallas kernels for gsa-jax: GPU (Triton: gla*.py) and TPU (Mosaic: tpu_*.py)."""

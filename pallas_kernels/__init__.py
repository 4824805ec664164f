"""GPU kernels (Pallas) for gsa-jax."""

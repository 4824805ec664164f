"""The compiled program of a sharded train step with the GSA kernels selected: every device runs
the kernels on its own rows and heads, so XLA's partitioner gathers no activation around them.

A kernel is opaque to the partitioner (on a GPU a Triton custom call; in Pallas' interpreter a
loop over the grid that slices the batch by program id): without `ops.pallas.per_shard`
it gathers q/k/v/s/g, the states and the segment runs of the whole global batch onto every
device. Parameters (FSDP) are still gathered; they are of rank <= 2 here, while the kernels'
operands are of rank 4 ([B, T, heads, dim] and [B, heads, K, V]) and the runs [B, T].

On the CPU: 8 simulated devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, set by
tests/test_sharding.py, which runs this file in a subprocess), the GPU selection faked, the
kernels interpreted. On a host with several GPUs: the real Triton kernels, as custom calls.
With fewer than 2 devices it skips.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from gsa_jax import sharding as shd
from gsa_jax import steps
from gsa_jax.models import CausalLM, get_preset
from gsa_jax.optim import OptimConfig, make_optimizer
from gsa_jax.ops import pallas as ops_pallas

pytestmark = pytest.mark.skipif(jax.device_count() < 2,
                                reason="needs several devices (run through tests/test_sharding.py)")

B, T = 16, 48   # distinct from every parameter dimension
CONFIG = get_preset("gsa-tiny", vocab_size=264, num_layers=1, num_slots=16, chunk_size=16)
ON_GPU = jax.default_backend() == "gpu"


def _mesh_shape(n: int) -> tuple[int, int, int]:
    return (2, 2, 2) if n == 8 else (n // 2, 1, 2)   # batch over data (x fsdp), heads over 2


def compiled_train_step(monkeypatch, per_shard: bool) -> str:
    """The optimized HLO of one train step of CONFIG on all devices, impl="auto" resolving to
    the kernels."""
    if not ON_GPU:
        monkeypatch.setattr(ops_pallas, "backend", lambda: "gpu")
    if not per_shard:
        monkeypatch.setattr(ops_pallas, "per_shard", lambda fn, *args, **kwargs: fn)
    model = CausalLM(CONFIG)
    tx, schedule = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=1), 10)
    mesh = shd.make_mesh(shd.MeshConfig(*_mesh_shape(jax.device_count())))
    layout = steps.state_layout(model, tx, mesh)
    step = steps.make_train_step(model, tx, schedule, layout, mesh)
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=shd.batch_sharding(mesh))
             for k in steps.BATCH_KEYS}
    lowered = step.lower(layout.abstract, batch)
    # The partitioner runs whatever the backend's optimisation level: keep the CPU's LLVM
    # work (the interpreted kernels' loops) small.
    options = {} if ON_GPU else {"xla_backend_optimization_level": 0,
                                 "xla_llvm_disable_expensive_passes": True}
    return lowered.compile(compiler_options=options).as_text()


def all_gathers(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, shape) of the result of every all-gather of the HLO text."""
    found = re.findall(r"= (\w+)\[([\d,]*)\]\{[^}]*\} all-gather(?:-start)?\(", hlo)
    return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in found]


def activation_gathers(hlo: str) -> list:
    """The gathers of kernel operands: rank >= 4, or the global batch of tokens [B, T]."""
    return [(d, s) for d, s in all_gathers(hlo) if len(s) >= 4 or s[:2] == (B, T)]


def test_no_activation_is_gathered_around_the_kernels(monkeypatch):
    hlo = compiled_train_step(monkeypatch, per_shard=True)
    gathers = all_gathers(hlo)
    assert gathers, "expected the FSDP parameter gathers (is the HLO pattern still right?)"
    assert activation_gathers(hlo) == [], activation_gathers(hlo)
    if ON_GPU:  # the kernels really are in the program, as Triton custom calls
        assert "__gpu$xla.gpu.triton" in hlo


@pytest.mark.slow
def test_without_per_shard_the_activations_are_gathered(monkeypatch):
    """The check above is not vacuous: the same step with `per_shard` switched off gathers the
    kernels' operands (the global batch, all heads) onto every device."""
    hlo = compiled_train_step(monkeypatch, per_shard=False)
    gathered = activation_gathers(hlo)
    assert any(s[0] == B and T in s for _, s in gathered), gathered

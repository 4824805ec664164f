"""The Pallas kernels under a device mesh, on 8 simulated CPU devices: every device runs them on
its own slice of the batch and heads (`gsa_jax.ops.pallas.per_shard`), and the result is the
unsharded float64 recurrence's.

Needs XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax starts:
test_pallas_tpu.py runs this file in a subprocess with it set; in a 1-device session it skips.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from gsa_jax import sharding as shd
from gsa_jax.ops import gated_slot_attention
from gsa_jax.ops import pallas as ops_pallas
from ops_util import enable_x64, gsa_inputs, relative_error
from test_pallas_kernels import F32_REL, _segments
from test_pallas_tpu import _pallas_calls

pytestmark = pytest.mark.skipif(jax.device_count() < 8,
                                reason="needs 8 devices (run through tests/test_pallas_tpu.py)")

B, T, H, HKV, K, V, M, C = 4, 40, 4, 2, 16, 32, 16, 16  # batch over 2 x 2, kv heads over 2


def _run(args, cot, seg, impl):
    def fn(q, k, v, s, g, hk0, hv0):
        return gated_slot_attention(q, k, v, s, g, initial_state=(hk0, hv0),
                                    return_final_state=True, segment_ids=seg, impl=impl,
                                    chunk_size=C)
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(cot)


@pytest.mark.parametrize("backend", ["tpu", pytest.param("gpu", marks=pytest.mark.slow)])
def test_kernels_run_per_device_slice(monkeypatch, backend):
    """Under a (data 2, fsdp 2, tensor 2) mesh with batch- and head-sharded inputs: the
    kernels' grids cover one device's slice (B/4 rows, H/2 heads), and values, final states
    and all gradients equal the float64 recurrence computed without a mesh."""
    monkeypatch.setattr(ops_pallas, "backend", lambda: backend)
    x = gsa_inputs(600, B, T, H, HKV, K, V, M)
    rng = np.random.default_rng(601)
    cot = (rng.standard_normal((B, T, H, V)),
           (rng.standard_normal((B, HKV, K, M)), rng.standard_normal((B, HKV, M, V))))
    seg = _segments(602, B, T)
    with enable_x64():
        ref = jax.jit(_run, static_argnums=3)(
            jax.tree.map(jnp.asarray, tuple(x)), jax.tree.map(jnp.asarray, cot),
            jnp.asarray(seg), "recurrent")
        ref = jax.tree.map(np.asarray, ref)

    mesh = shd.make_mesh(shd.MeshConfig(2, 2, 2))
    batch = ("data", "fsdp")
    seq, state = P(batch, None, "tensor", None), P(batch, "tensor", None, None)

    def put(a, spec):
        return jax.device_put(jnp.asarray(a, jnp.float32), NamedSharding(mesh, spec))

    args = tuple(put(a, spec) for a, spec in zip(x, [seq] * 5 + [state] * 2))
    cot = (put(cot[0], seq), (put(cot[1][0], state), put(cot[1][1], state)))
    seg = jax.device_put(jnp.asarray(seg), NamedSharding(mesh, P(batch, None)))
    fn = jax.jit(_run, static_argnums=3)
    with shd.sharding_context(mesh):
        calls = _pallas_calls(lambda *a: _run(*a, "pallas"), args, cot, seg)
        out, grads = fn(args, cot, seg, "pallas")
    assert calls
    for name, eqn in calls.items():  # every kernel sees one device's rows (and heads)
        assert eqn.invars[0].aval.shape[0] == B // 4, name
        if backend == "tpu":  # grid (B, H, chunks)
            assert eqn.params["grid_mapping"].grid[:2] == (B // 4, H // 2), name
    for name, a, r in zip(["o", "Hk", "Hv", "dq", "dk", "dv", "ds", "dg", "dHk0", "dHv0"],
                          jax.tree.leaves((out, grads)), jax.tree.leaves(ref)):
        err = relative_error(np.asarray(a), r)
        assert err < F32_REL, f"{name}: relative error {err:.2e}"

"""gsa_jax.layers.Embed: the lookup gathers from the float32 table, so the gradient of a
bfloat16 model sums a repeated token's updates in float32 (flax's nn.Embed sums them in
bfloat16). References: the table rows by NumPy indexing, and float64 `np.add.at` sums."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsa_jax.layers import Embed

V, D = 64, 8


def _ids(seed, shape, repeated_share):
    """int32 ids with `repeated_share` of positions set to token 3, the rest uniform."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=shape).astype(np.int32)
    ids[rng.random(shape) < repeated_share] = 3
    return ids


def _grad(module, ids, w):
    params = module.init(jax.random.key(0), ids[:1])["params"]
    loss = lambda p: jnp.sum(module.apply({"params": p}, ids).astype(jnp.float32) * w)
    return params, jax.grad(loss)(params)["embedding"]


def test_forward_is_the_table_rows_in_the_compute_dtype():
    ids = _ids(0, (3, 17), 0.3)
    embed = Embed(V, D, dtype=jnp.bfloat16)
    params = embed.init(jax.random.key(1), ids)["params"]
    out = embed.apply({"params": params}, ids)
    assert out.dtype == jnp.bfloat16 and out.shape == (3, 17, D)
    table = np.asarray(params["embedding"])
    assert params["embedding"].dtype == jnp.float32
    expected = jnp.asarray(table[ids]).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))


def test_bfloat16_gradient_of_a_repeated_token_is_summed_in_float32():
    # 4096 positions, 90% the same token: the case where a bfloat16 sum loses digits.
    ids = jnp.asarray(_ids(2, (8, 512), 0.9))
    w = jax.random.normal(jax.random.key(3), (8, 512, D), jnp.float32)
    # Reference: the cotangents as the model sees them (bfloat16-rounded), summed in float64.
    w64 = np.asarray(w.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    ref = np.zeros((V, D))
    np.add.at(ref, np.asarray(ids).reshape(-1), w64.reshape(-1, D))
    scale = np.max(np.abs(ref))

    _, ours = _grad(Embed(V, D, dtype=jnp.bfloat16), ids, w)
    assert ours.dtype == jnp.float32
    ours_err = np.max(np.abs(np.asarray(ours, np.float64) - ref)) / scale
    assert ours_err < 1e-5, ours_err

    # The case discriminates: flax's nn.Embed (table cast first) sums in bfloat16.
    _, flax_grad = _grad(nn.Embed(V, D, dtype=jnp.bfloat16), ids, w)
    flax_err = np.max(np.abs(np.asarray(flax_grad, np.float64) - ref)) / scale
    assert flax_err > 100 * max(ours_err, 1e-7), (flax_err, ours_err)


def test_same_parameters_and_tied_head_as_flax_embed():
    ids = _ids(4, (2, 5), 0.0)
    ours, theirs = Embed(V, D), nn.Embed(V, D)
    p_ours = ours.init(jax.random.key(5), ids)
    p_theirs = theirs.init(jax.random.key(5), ids)
    assert jax.tree.structure(p_ours) == jax.tree.structure(p_theirs)
    x = jax.random.normal(jax.random.key(6), (2, 5, D))
    np.testing.assert_allclose(ours.apply(p_theirs, x, method="attend"),
                               theirs.apply(p_theirs, x, method="attend"), rtol=1e-6)
    np.testing.assert_array_equal(ours.apply(p_theirs, ids), theirs.apply(p_theirs, ids))


def test_float_ids_are_refused():
    embed = Embed(V, D)
    params = embed.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    with pytest.raises(ValueError, match="integers"):
        embed.apply(params, jnp.zeros((1, 2), jnp.float32))

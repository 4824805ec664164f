"""Our GSA, GLA and RetNet layers are function for function fla's (the peer's)
`GatedSlotAttention`, `GatedLinearAttention` and `MultiScaleRetention`.

The reference is fla itself (flash-linear-attention 0.6.0, skipped when absent): its layer is
built with the options under test, every weight drawn at random (norm scales around 1, gate
biases non-zero), the weights copied into our layer through `gsa_jax.hf.fla.mixer_map` (every
fla tensor used, every one of our parameters set), and both layers run on the same random input
in float32. fla runs on the CPU through its reference path (tests/fla_reference.py: its naive
recurrences in place of the Triton kernels).

The settings are first the ones of the authors' MQAR runs (PAPER.md section 4, their Zoology
fork): GSA 4 heads, slots = D/4, gate normaliser 16, scale=None (K^-1/2), no short conv; GLA 2
heads, expand_k 1 and fla's defaults otherwise (low-rank gate 16, normaliser 16, swish output
gate, per-head norm, identity feature map); RetNet 2 heads. Then variants for each option the
loader maps (grouped k/v heads, short convs, feature maps, no output gate, no norm scale).
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.reference
torch = pytest.importorskip("torch")
pytest.importorskip("fla")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402

import fla_reference  # noqa: E402
from script_util import load_experiment  # noqa: E402
from gsa_jax.hf.fla import mixer_map  # noqa: E402
from gsa_jax.layers import (GatedLinearAttention, GatedSlotAttention,  # noqa: E402
                            MultiScaleRetention)

# Every parameter random: matrices N(0, 1/fan_in), norm scales 1 + N(0, 0.3²), biases
# N(0, 0.5²) (the GPU parity script's initialisation).
randomize = load_experiment("fla_parity").randomize
D, B, T = 64, 2, 40
RTOL = 1e-4  # float32 on both sides; observed ~1e-6 of the output's scale


def ours_params(layer, kind: str, ours, x) -> dict:
    """Our layer's params from the fla layer's weights, checked to cover both sides."""
    state = {k: v.numpy() for k, v in layer.state_dict().items()}
    mapping = mixer_map(kind, use_output_gate=getattr(layer, "use_output_gate", True),
                        elementwise_affine=state.get(_norm_name(layer)) is not None,
                        use_short_conv=layer.use_short_conv,
                        fused_gate_norm=getattr(layer, "fuse_norm_and_gate", True))
    assert {name for name, _ in mapping.values()} == set(state), "fla tensors not all mapped"
    params: dict = {}
    for path, (name, transform) in mapping.items():
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(transform.to_ours(state[name]))
    want = nn.meta.unbox(jax.eval_shape(ours.init, jax.random.key(0), x)["params"])
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, want)
    return params


def _norm_name(layer) -> str:
    return "g_norm_swish_gate.weight" if getattr(layer, "fuse_norm_and_gate", False) \
        else "g_norm.weight"


def compare(layer, kind: str, ours, seed: int = 0) -> None:
    randomize(torch, layer, seed)
    layer.eval()
    x = np.random.default_rng(seed + 1).standard_normal((B, T, D)).astype(np.float32)
    with fla_reference.cpu_reference():
        ref = layer(torch.from_numpy(x))[0].numpy()
    params = ours_params(layer, kind, ours, jnp.asarray(x))
    got = np.asarray(ours.apply({"params": params}, jnp.asarray(x))[0])
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=RTOL * np.abs(ref).max())


# ------------------------------------------------------------------------------------ GSA
GSA_CASES = {
    # The authors' MQAR layer: fla.layers.gsa.GatedSlotAttention(num_heads=4,
    # num_slots=d_model // 4, gate_logit_normalizer=16, scale=None) (norm_first=False).
    "mqar": dict(num_heads=4, num_slots=D // 4, gate_logit_normalizer=16, scale=None),
    "lm": dict(num_heads=4, num_slots=8, gate_logit_normalizer=8),  # the LM default, scale 1
    "gqa_conv_relu": dict(num_heads=4, num_kv_heads=2, num_slots=8, use_short_conv=True,
                          feature_map="relu", expand_k=0.5),
    "no_norm_scale": dict(num_heads=2, num_slots=6, elementwise_affine=False),
}


@pytest.mark.parametrize("case", sorted(GSA_CASES))
def test_gsa_layer_equals_fla(case):
    from fla.layers import GatedSlotAttention as FlaGSA
    kw = GSA_CASES[case]
    layer = FlaGSA(hidden_size=D, layer_idx=0, **kw)
    # fla's output norm is rms_norm_linear(...) with its default eps 1e-5 (not norm_eps).
    scale = layer.head_k_dim ** -0.5 if kw.get("scale", 1.0) is None else 1.0
    ours = GatedSlotAttention(
        D, num_heads=layer.num_heads, num_kv_heads=layer.num_kv_heads,
        num_slots=layer.num_slots, expand_k=layer.expand_k, expand_v=layer.expand_v,
        feature_map=kw.get("feature_map", "swish"),
        gate_logit_normalizer=layer.gate_logit_normalizer, use_short_conv=layer.use_short_conv,
        elementwise_affine=kw.get("elementwise_affine", True), norm_eps=1e-5, scale=scale)
    compare(layer, "gsa", ours)


# ------------------------------------------------------------------------------------ GLA
GLA_CASES = {
    # The authors' MQAR layer: fla.layers.gla.GatedLinearAttention(num_heads=2, expand_k=1).
    "mqar": dict(num_heads=2, expand_k=1.0),
    "lm": dict(num_heads=4),  # expand_k 0.5, the LM default
    "gqa_conv_swish": dict(num_heads=4, num_kv_heads=2, use_short_conv=True,
                           feature_map="swish"),
    "no_output_gate_relu": dict(num_heads=2, use_output_gate=False, feature_map="relu"),
    "unfused_norm_gate": dict(num_heads=2, fuse_norm=False, elementwise_affine=False),
}


@pytest.mark.parametrize("case", sorted(GLA_CASES))
def test_gla_layer_equals_fla(case):
    from fla.layers import GatedLinearAttention as FlaGLA
    kw = GLA_CASES[case]
    layer = FlaGLA(hidden_size=D, layer_idx=0, **kw)
    fm = {None: "identity", "swish": "swish", "relu": "relu"}[kw.get("feature_map")]
    ours = GatedLinearAttention(
        D, num_heads=layer.num_heads, num_kv_heads=layer.num_kv_heads,
        expand_k=layer.expand_k, expand_v=layer.expand_v, feature_map=fm,
        gate_logit_normalizer=layer.gate_logit_normalizer,
        gate_low_rank_dim=layer.gk_proj[0].out_features, use_short_conv=layer.use_short_conv,
        use_output_gate=layer.use_output_gate,
        elementwise_affine=kw.get("elementwise_affine", True), norm_eps=1e-5)
    compare(layer, "gla", ours, seed=1)


# ------------------------------------------------------------------------------------ RetNet
RETNET_CASES = {
    # The authors' MQAR layer: fla.layers.MultiScaleRetention(num_heads=2).
    "mqar": dict(num_heads=2),
    "gqa_no_gate": dict(num_heads=4, num_kv_heads=2, use_output_gate=False),
}


@pytest.mark.parametrize("case", sorted(RETNET_CASES))
def test_retnet_layer_equals_fla(case):
    from fla.layers import MultiScaleRetention as FlaRetNet
    kw = RETNET_CASES[case]
    layer = FlaRetNet(hidden_size=D, layer_idx=0, **kw)
    ours = MultiScaleRetention(
        D, num_heads=layer.num_heads, num_kv_heads=layer.num_kv_heads,
        expand_k=layer.expand_k, expand_v=layer.expand_v,
        use_output_gate=layer.use_output_gate, norm_eps=1e-5)
    compare(layer, "retnet", ours, seed=2)

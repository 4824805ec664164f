"""flash-linear-attention (the peer, `fla`) on a CPU: its models and layers with every Triton
kernel replaced by a PyTorch reference, for the parity tests against our layers and loader.

fla 0.6.0 runs its token mixers, norms, SwiGLU, short convolutions and rotary embeddings as
Triton kernels, which need a GPU. `cpu_reference()` swaps exactly these calls (by monkeypatching
the names fla's modules look up at call time) for torch code; everything else (the modules, the
parameter layout, which eps/scale/activation goes where, head grouping, gating) stays fla's own:

    fla.layers.gsa      fused_recurrent_gsa, chunk_gsa   -> fla.ops.gsa.naive.naive_recurrent_gsa
                        rms_norm_linear (g_norm, o_proj) -> fla's rms_norm_ref, then F.linear
    fla.layers.gla      fused_recurrent_gla, chunk_gla,
                        fused_chunk_gla                  -> fla.ops.gla.naive.naive_recurrent_gla
    fla.layers.multiscale_retention
                        chunk/fused_chunk/parallel/fused_recurrent_retention
                                                         -> fla.ops.retention.naive.naive_retention
    fla.modules.norm.layernorm.rms_norm (RMSNorm)        -> fla's rms_norm_ref (float32)
    fla.modules.norm.fused_norm_gate.rms_norm_gated      -> rms_norm_ref(x) * act(g)
    fla.modules.mlp.swiglu_linear / swiglu               -> silu(gate) * up (then F.linear)
    fla.modules.causal_conv1d.ops.causal_conv1d          -> depthwise F.conv1d, left-padded
    fla.modules.rotary.ops.rotary_embedding              -> fla's rotary_embedding_ref
    fla.modules.activations.ops.swish_fwd (swish feature
                        map, ACT2FN["swish"])            -> F.silu in float32

Only what the tests use is covered: whole sequences from position 0 without a cache (call the
models with use_cache=False), no packed inputs (cu_seqlens), no autograd. Anything else raises
NotImplementedError.
"""

from __future__ import annotations

import contextlib
import importlib

import torch
import torch.nn.functional as F


def _no_varlen(kwargs: dict, what: str) -> None:
    if kwargs.get("cu_seqlens") is not None:
        raise NotImplementedError(f"{what}: packed inputs (cu_seqlens) are not covered")


def _rms_norm(x, weight, bias=None, residual=None, eps=1e-5, prenorm=False,
              residual_in_fp32=False, **_):
    """fla's rms_norm_ref in float32; with prenorm also the sum x + residual, in the dtype
    fla's kernel returns it (the residual's, else x's; float32 with residual_in_fp32)."""
    from fla.modules.norm.layernorm import rms_norm_ref
    ones = torch.ones(x.shape[-1], dtype=torch.float32)
    out = rms_norm_ref(x, ones if weight is None else weight, bias, residual=residual, eps=eps,
                       prenorm=prenorm, upcast=True)
    if not prenorm:
        return out
    dtype = torch.float32 if residual_in_fp32 else (x if residual is None else residual).dtype
    return out[0], out[1].to(dtype)


def _rms_norm_linear(x, norm_weight, norm_bias, linear_weight, linear_bias, residual=None,
                     eps=1e-5, prenorm=False, residual_in_fp32=False):
    y = _rms_norm(x, norm_weight, norm_bias, residual, eps, prenorm)
    out, rest = (y[0], y[1:]) if prenorm else (y, ())
    out = F.linear(out.to(linear_weight.dtype), linear_weight, linear_bias)
    return (out, *rest) if prenorm else out


def _rms_norm_gated(x, g, weight, bias, activation="swish", residual=None, prenorm=False,
                    residual_in_fp32=False, eps=1e-6):
    if residual is not None or prenorm:
        raise NotImplementedError("rms_norm_gated: residual/prenorm are not covered")
    act = {"swish": F.silu, "silu": F.silu, "sigmoid": torch.sigmoid}[activation]
    y = _rms_norm(x, weight, bias, eps=eps)
    return (y.float() * act(g.float())).to(x.dtype)


def _swish_fwd(x, output_contiguous=False):
    return F.silu(x.float()).to(x.dtype)


def _swiglu(x, y):
    return F.silu(x.float()) * y.float()


def _swiglu_linear(x, y, weight, bias):
    return F.linear(_swiglu(x, y).to(weight.dtype), weight, bias)


def _causal_conv1d(x, weight=None, bias=None, residual=None, initial_state=None,
                   output_final_state=False, activation=None, **kwargs):
    """x [B, T, D]; weight [D, W]: y_t = Σ_i w[i] x_{t-W+1+i} (+ bias), then the activation."""
    _no_varlen(kwargs, "causal_conv1d")
    if initial_state is not None or output_final_state:
        raise NotImplementedError("causal_conv1d: caches are not covered")
    D, W = weight.shape
    y = F.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=W - 1, groups=D)
    y = y[..., :x.shape[1]].transpose(1, 2)
    if activation in ("silu", "swish"):
        y = F.silu(y)
    if residual is not None:
        y = y + residual
    return y, None


def _rotary_embedding(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0,
                      cu_seqlens=None, chunk_indices=None):
    from fla.modules.rotary.ops import rotary_embedding_ref
    if cu_seqlens is not None or not isinstance(seqlen_offsets, int):
        raise NotImplementedError("rotary_embedding: packed inputs / tensor offsets")
    T = x.shape[1]
    return rotary_embedding_ref(x, cos[seqlen_offsets:seqlen_offsets + T],
                                sin[seqlen_offsets:seqlen_offsets + T], interleaved)


def _gsa(q, k, v, s, g, initial_state=None, output_final_state=False, scale=1.0, **kwargs):
    """fla's layer layout [B, T, H, *] in and out; the naive form computes in float32."""
    from fla.ops.gsa.naive import naive_recurrent_gsa
    _no_varlen(kwargs, "gsa")
    return naive_recurrent_gsa(q, k, v, s, g, scale=scale, initial_state=initial_state,
                               output_final_state=output_final_state)


def _gla(q, k, v, gk=None, g=None, initial_state=None, output_final_state=False,
         state_v_first=False, scale=None, **kwargs):
    from fla.ops.gla.naive import naive_recurrent_gla
    _no_varlen(kwargs, "gla")
    if scale is not None and scale != q.shape[-1] ** -0.5:
        raise NotImplementedError("gla: the naive form has scale K^-0.5 only")
    if state_v_first and (initial_state is not None or output_final_state):
        raise NotImplementedError("gla: states in the [V, K] layout are not covered")
    return naive_recurrent_gla(q, k, v, gk if gk is not None else g, initial_state,
                               output_final_state)


def _retention(q, k, v, initial_state=None, output_final_state=False, **kwargs):
    from fla.ops.retention.naive import naive_retention
    _no_varlen(kwargs, "retention")
    if initial_state is not None or output_final_state:
        raise NotImplementedError("retention: states are not covered")
    o = naive_retention(*(x.transpose(1, 2) for x in (q, k, v)))  # head-first [B, H, T, *]
    return o.transpose(1, 2), None


PATCHES = {
    "fla.layers.gsa": {"fused_recurrent_gsa": _gsa, "chunk_gsa": _gsa,
                       "rms_norm_linear": _rms_norm_linear},
    "fla.layers.gla": {"fused_recurrent_gla": _gla, "chunk_gla": _gla, "fused_chunk_gla": _gla},
    "fla.layers.multiscale_retention": {
        "chunk_retention": _retention, "fused_chunk_retention": _retention,
        "parallel_retention": _retention, "fused_recurrent_retention": _retention},
    "fla.modules.norm.layernorm": {"rms_norm": _rms_norm},
    "fla.modules.norm.fused_norm_gate": {"rms_norm_gated": _rms_norm_gated},
    "fla.modules.mlp": {"swiglu_linear": _swiglu_linear, "swiglu": _swiglu},
    "fla.modules.causal_conv1d.ops": {"causal_conv1d": _causal_conv1d},
    "fla.modules.rotary.ops": {"rotary_embedding": _rotary_embedding},
    "fla.modules.activations.ops": {"swish_fwd": _swish_fwd},
}


@contextlib.contextmanager
def cpu_reference():
    """Within the block, fla's layers and models run on the CPU through the references above."""
    saved = []
    try:
        for module_name, names in PATCHES.items():
            module = importlib.import_module(module_name)
            for name, replacement in names.items():
                if not hasattr(module, name):  # fla moved something: fail loudly, not silently
                    raise AttributeError(f"{module_name} has no {name}: update fla_reference")
                saved.append((module, name, getattr(module, name)))
                setattr(module, name, replacement)
        with torch.no_grad():
            yield
    finally:
        for module, name, original in reversed(saved):
            setattr(module, name, original)

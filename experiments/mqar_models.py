"""The model of MQAR as the GSA authors ran it (experiments/mqar_authors.py): Zoology's
`LanguageModel` with the authors' mixers (that module's docstring gives the layout and the
initialisation), and the recurrent state each mixer keeps.
"""

from __future__ import annotations

import functools
import math
from typing import Any


def state_size(name: str, width: int, seq_len: int) -> int:
    """Recurrent state per layer (floats per sequence): GSA H·(dk·M + M·dv) = D²/2 (M = D/4);
    GLA H·dk·dv = D²/2 (2 heads, expand_k 1); RetNet H·dk·dv = D² (expand_v 2); attention its
    KV cache 2·T·D at T."""
    return {"gsa": width * width // 2, "gla": width * width // 2, "retnet": width * width,
            "attention": 2 * seq_len * width}[name]


def build(name: str, width: int, args):
    """AuthorsLM for model `name` at width D."""
    return AuthorsLM(name, width, args.vocab_size, args.seq_len, args.num_layers,
                     args.embed_dropout, args.attn_dropout, args.dtype, args.impl)


@functools.lru_cache(maxsize=None)
def _modules():
    """(MHA, AuthorsLM): flax classes, built on first use so that parsing needs no jax."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from gsa_jax.layers import Embed, GatedLinearAttention, GatedSlotAttention, MultiScaleRetention

    normal = nn.initializers.normal

    class MHA(nn.Module):
        """Zoology's MHA: x [B, T, D] -> [B, T, D], causal softmax attention, weights dropped
        with `dropout` in training."""
        width: int
        num_heads: int = 1
        dropout: float = 0.1
        out_std: float = 0.02
        dtype: Any = jnp.float32

        @nn.compact
        def __call__(self, x_BTD, train: bool):
            B, T, D = x_BTD.shape
            H, dh = self.num_heads, D // self.num_heads
            qkv = nn.Dense(3 * D, kernel_init=normal(0.02), dtype=self.dtype, name="Wqkv")(x_BTD)
            q_BTHd, k_BTHd, v_BTHd = (a.reshape(B, T, H, dh) for a in jnp.split(qkv, 3, -1))
            s_BHTT = jnp.einsum("bthd,bshd->bhts", q_BTHd, k_BTHd).astype(jnp.float32)
            s_BHTT = s_BHTT / math.sqrt(dh)
            causal = jnp.tril(jnp.ones((T, T), bool))
            # float32 softmax: the logits of 512 positions in bfloat16 lose the small weights.
            w_BHTT = jax.nn.softmax(jnp.where(causal, s_BHTT, -jnp.inf), axis=-1)
            w_BHTT = nn.Dropout(self.dropout, deterministic=not train)(w_BHTT)
            o_BTHd = jnp.einsum("bhts,bshd->bthd", w_BHTT.astype(self.dtype), v_BTHd)
            return nn.Dense(D, kernel_init=normal(self.out_std), dtype=self.dtype,
                            name="out_proj")(o_BTHd.reshape(B, T, D))

    class AuthorsLM(nn.Module):
        """Zoology's LanguageModel with the authors' mixers (module docstring). Call:
        (tokens [B, T] int, train) -> float32 logits [B, T, V]; train=True drops (needs the
        "dropout" rng)."""
        model: str
        width: int
        vocab_size: int
        seq_len: int
        num_layers: int = 4
        embed_dropout: float = 0.1
        attn_dropout: float = 0.1
        dtype: str = "float32"
        impl: str = "auto"

        def mixer(self, i: int):
            D, dt = self.width, jnp.dtype(self.dtype)
            # Zoology re-initialises every linear normal(0.02) and rescales only modules named
            # out_proj/fc2, which fla's layers (o_proj) do not have: out_std 0.02 here.
            kw = dict(std=0.02, out_std=0.02, dtype=dt, norm_eps=1e-5, impl=self.impl,
                      name=f"mixer_{i}")
            if self.model == "gsa":
                return GatedSlotAttention(D, num_heads=4, num_slots=D // 4,
                                          gate_logit_normalizer=16.0, feature_map="swish",
                                          scale=(D // 4) ** -0.5, **kw)
            if self.model == "gla":
                return GatedLinearAttention(D, num_heads=2, expand_k=1.0, expand_v=1.0,
                                            feature_map="identity", gate_logit_normalizer=16.0,
                                            gate_low_rank_dim=16, use_output_gate=True, **kw)
            if self.model == "retnet":
                return MultiScaleRetention(D, num_heads=2, expand_k=1.0, expand_v=2.0,
                                           use_output_gate=True, **kw)
            raise ValueError(f"unknown model {self.model!r}")

        @nn.compact
        def __call__(self, tokens_BT, train: bool = False, where_BP=None):
            """where_BP: [B, P] positions whose logits to return ([B, P, V]; None: all)."""
            B, T = tokens_BT.shape
            dt = jnp.dtype(self.dtype)
            embed = Embed(self.vocab_size, self.width, embedding_init=normal(0.02), dtype=dt,
                          name="embed")
            r_BTD = embed(tokens_BT)   # [B, T, D] in dt
            if self.model == "attention":   # positions only for attention, as Zoology
                pos = Embed(self.seq_len, self.width, embedding_init=normal(0.02), dtype=dt,
                            name="pos_embed")
                r_BTD = r_BTD + pos(jnp.arange(T))[None]
            r_BTD = nn.Dropout(self.embed_dropout, deterministic=not train)(r_BTD)
            ln = functools.partial(nn.LayerNorm, epsilon=1e-5, dtype=dt)
            for i in range(self.num_layers):
                h_BTD = ln(name=f"norm1_{i}")(r_BTD)
                if self.model == "attention":
                    h_BTD = MHA(self.width, 1, self.attn_dropout,
                                out_std=0.02 / math.sqrt(2 * self.num_layers), dtype=dt,
                                name=f"mixer_{i}")(h_BTD, train)
                else:
                    h_BTD = self.mixer(i)(h_BTD)[0]
                r_BTD = r_BTD + h_BTD
                # Zoology's block returns norm2(residual) (state mixer Identity) and the next
                # block, or the final norm, adds it to the residual.
                r_BTD = r_BTD + ln(name=f"norm2_{i}")(r_BTD)
            x_BTD = ln(name="norm_f")(r_BTD)
            if where_BP is not None:   # the head only where the loss looks: 64 of 512 positions
                x_BTD = jnp.take_along_axis(x_BTD, where_BP[..., None], axis=1)
            # The head in the compute dtype; the loss and argmax want float32.
            return embed.attend(x_BTD).astype(jnp.float32)

    return MHA, AuthorsLM


def AuthorsLM(*args, **kwargs):   # noqa: N802 (a class, built lazily)
    return _modules()[1](*args, **kwargs)

"""The peer of experiments/efficiency.py (flash-linear-attention's GSA, PyTorch/Triton): one
train step of `fla.models.GSAForCausalLM` at the sizes of our preset, or, where `fla.models` does
not import (it needs `transformers`), the same blocks written in torch around
`fla.ops.gsa.chunk_gsa`. bf16 autocast, f32 parameters, fused AdamW; checkpoint_level 2 (the
peer's default: chunk states recomputed in the backward), level 0 for fla-gsa-norecompute.

Imports torch and fla only inside the functions: a worker without them records the row as
"unavailable".
"""

from __future__ import annotations

import functools
import time

from experiments import harness
from experiments.efficiency_cases import model_config


def _torch_gsa_lm(cfg, level: int):
    """The GSA LM of `cfg` in torch around the peer's `chunk_gsa` (when `fla.models` is missing):
    embeddings, L blocks [x += GSA(RMSNorm x); x += SwiGLU(RMSNorm x)], RMSNorm, LM head."""
    import torch
    import torch.nn.functional as F
    from fla.ops.gsa import chunk_gsa

    D, H, M, W = cfg.hidden_size, cfg.num_heads, cfg.num_slots, cfg.mlp_width
    lin = functools.partial(torch.nn.Linear, bias=False)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn_norm, self.mlp_norm = (torch.nn.RMSNorm(D, eps=cfg.norm_eps)
                                             for _ in range(2))
            self.g_norm = torch.nn.RMSNorm(D, eps=cfg.norm_eps,
                                           elementwise_affine=cfg.elementwise_affine)
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (lin(D, D) for _ in range(4))
            self.f_proj = lin(D, H * M)
            self.gate_proj, self.up_proj, self.down_proj = lin(D, W), lin(D, W), lin(W, D)

        def forward(self, x):
            B, T, _ = x.shape
            h = self.attn_norm(x)
            q, k = (F.silu(p(h)).view(B, T, H, -1) for p in (self.q_proj, self.k_proj))
            v = F.silu(self.v_proj(h)).view(B, T, H, -1)
            g = F.logsigmoid(self.f_proj(h).float()).view(B, T, H, M) / cfg.gate_logit_normalizer
            s = -torch.expm1(g)
            o, _ = chunk_gsa(q, k, v, s.to(q.dtype), g.to(q.dtype), scale=1.0,
                             checkpoint_level=level)
            x = x + self.o_proj(self.g_norm(F.silu(o.reshape(B, T, D))))
            h = self.mlp_norm(x)
            return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(cfg.vocab_size, D)
            self.blocks = torch.nn.ModuleList(Block() for _ in range(cfg.num_layers))
            self.norm = torch.nn.RMSNorm(D, eps=cfg.norm_eps)
            self.lm_head = lin(D, cfg.vocab_size)

        def forward(self, input_ids, labels):
            x = self.embed(input_ids)
            for block in self.blocks:
                x = block(x)
            logits = self.lm_head(self.norm(x)).float()
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    return LM()


def _peer_model(cfg, level: int):
    """(torch module whose forward(input_ids, labels) gives the loss, description)."""
    import torch
    try:
        import fla.layers.gsa as fla_gsa_layer
        from fla.models import GSAConfig, GSAForCausalLM
    except Exception as error:  # noqa: BLE001 - e.g. no transformers: the same model by hand
        return _torch_gsa_lm(cfg, level), (f"torch blocks around fla.ops.gsa.chunk_gsa "
                                           f"(fla.models unavailable: {type(error).__name__}: "
                                           f"{error})"[:300])
    if level != 2:  # the layer calls chunk_gsa with the default checkpoint_level=2
        fla_gsa_layer.chunk_gsa = functools.partial(fla_gsa_layer.chunk_gsa,
                                                    checkpoint_level=level)
    config = GSAConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                       num_heads=cfg.num_heads, num_slots=cfg.num_slots,
                       gate_logit_normalizer=cfg.gate_logit_normalizer,
                       intermediate_size=cfg.mlp_width, norm_eps=cfg.norm_eps,
                       elementwise_affine=cfg.elementwise_affine, vocab_size=cfg.vocab_size,
                       tie_word_embeddings=cfg.tie_word_embeddings, feature_map=cfg.feature_map)
    model = GSAForCausalLM(config)

    class WithLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, labels):  # labels are shifted inside the model
            return self.inner(input_ids=input_ids, labels=labels).loss

    return WithLoss(), "fla.models.GSAForCausalLM"


def peer_case(args, model: str, T: int) -> dict:
    """One train step of the peer's GSA (bf16 autocast, f32 params, fused AdamW): the record of
    a "train" row at the sizes of our preset (`efficiency_cases.model_config`)."""
    B = max(1, args.tokens // T)
    row = {"part": "train", "model": model, "preset": f"gsa-{args.size}", "T": T, "B": B,
           "tokens": B * T, "dtype": "bfloat16 (torch.autocast)", "remat": False}
    level = 0 if model.endswith("norecompute") else 2
    try:
        import torch
        if not torch.cuda.is_available():
            raise ImportError("torch has no CUDA device")
        import fla
        from fla.ops.gsa import chunk_gsa  # noqa: F401
    except Exception as error:  # noqa: BLE001 - torch/fla missing: recorded, not fatal
        row.update(status="unavailable", reason=f"{type(error).__name__}: {error}"[:300])
        return row
    cfg = model_config(args, model)
    row.update(form=f"fla chunk_gsa checkpoint_level={level}", torch=torch.__version__,
               fla=getattr(fla, "__version__", None), device=torch.cuda.get_device_name())
    try:
        torch.manual_seed(0)
        net, how = _peer_model(cfg, level)
        net = net.cuda()
        row["implementation"] = how
        row["params"] = sum(p.numel() for p in net.parameters())
        opt = torch.optim.AdamW(net.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.01,
                                fused=True)
        tokens = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
        torch.cuda.reset_peak_memory_stats()

        def run():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = net(tokens, tokens)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            return loss

        start = time.perf_counter()
        run()  # autotunes the Triton kernels at this shape
        row["compile_s"] = round(time.perf_counter() - start, 2)
        for _ in range(max(args.peer_warmup - 1, 0)):
            run()
        median, fastest = harness.time_calls(run, args.repeats)
        row.update(step_ms=1e3 * median, min_step_ms=1e3 * fastest, tokens_per_s=B * T / median,
                   loss=float(run().item()), peak_bytes=int(torch.cuda.max_memory_allocated()),
                   status="ok")
    except Exception as error:  # noqa: BLE001
        row.update(harness.failure(error))
    return row


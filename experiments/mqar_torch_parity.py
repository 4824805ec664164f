"""An independent PyTorch build of the MQAR authors' setup, to check our harness against it.

Issue 21 asked whether the near-chance cells of `mqar_authors.py` come from a harness bug. This
script writes Zoology's attention LanguageModel and recipe again, in PyTorch, from Zoology's
definitions (not from our flax code): token + learned position embeddings, embedding dropout,
L pre-LayerNorm blocks of 1-head causal softmax attention (Wqkv, out_proj, dropout on the
weights) with no MLP, Zoology's residual bookkeeping (a block returns norm2(residual) and the
next block adds it), a final LayerNorm and tied output embeddings; every Linear normal(0.02)
with zero bias (out_proj 0.02 / sqrt(2L)); AdamW (weight decay 0.1 on every parameter), a
cosine lr to 0 stepped per step, cross-entropy over the query positions only. The data are
ours (`mqar_authors_train.datasets`: what the harness trains and evaluates on).

Two modes:

- `compare`: our flax model's initial parameters are copied into the torch model; the logits
  at every position, the loss, a few gradients and the parameters after one AdamW step are
  compared (float32, dropout off). Measured at V = 8192, T = 64, 8 pairs, D = 64, 4 layers:
  logits differ by 3.6e-7, loss 9.0168953 vs 9.0168972, gradients ~1e-8, one AdamW step 4.6e-7.
- `train`: the torch model trained from its own initialisation; prints the loss and held-out
  accuracy every --eval-every steps (and writes them to --out as JSON), for a curve to set
  beside `mqar_authors.py`'s at the same settings. Measured (CPU, one seed each): at V = 8192,
  T = 64, 8 pairs, D = 64, 20k rows, lr 1e-3, both implementations sit at ~13.5% after 3120
  steps; with 100k rows and lr 3e-3 both jump from ~11% to ~99% between steps 2500 and 3600.

    python experiments/mqar_torch_parity.py compare
    python experiments/mqar_torch_parity.py train --steps 3120 --eval-every 156 --out curve.json

Needs torch (the `reference` extra); the test is tests/test_mqar_torch_parity.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:   # `experiments` and `gsa_jax` from a checkout
    sys.path.insert(0, ROOT)

IGNORE = -100   # label of the non-query positions (gsa_jax.data.mqar.IGNORE)


def _torch_modules():
    """(ZoologyLM,) built on first use so that `--help` needs no torch."""
    import torch
    from torch import nn

    class MHA(nn.Module):
        """x [B, T, D] -> [B, T, D]: causal softmax attention, weights dropped in training."""

        def __init__(self, d, heads=1, dropout=0.1):
            super().__init__()
            self.h, self.dh = heads, d // heads
            self.Wqkv = nn.Linear(d, 3 * d)
            self.out_proj = nn.Linear(d, d)
            self.drop = nn.Dropout(dropout)

        def forward(self, x):
            B, T, D = x.shape
            q, k, v = (a.view(B, T, self.h, self.dh).transpose(1, 2)
                       for a in self.Wqkv(x).split(D, dim=-1))
            s = q @ k.transpose(-1, -2) / math.sqrt(self.dh)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            w = self.drop(s.masked_fill(~causal, float("-inf")).softmax(-1))
            return self.out_proj((w @ v).transpose(1, 2).reshape(B, T, D))

    class Block(nn.Module):
        def __init__(self, d, dropout):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.mixer = MHA(d, 1, dropout)

        def forward(self, residual):
            residual = residual + self.mixer(self.norm1(residual))
            return residual, self.norm2(residual)   # the state mixer is the identity

    class ZoologyLM(nn.Module):
        """tokens [B, T] -> logits [B, T, V], or [n, V] at the True positions of `mask`."""

        def __init__(self, vocab, seq_len, d, layers=4, embed_dropout=0.1, attn_dropout=0.1):
            super().__init__()
            self.embed, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq_len, d)
            self.drop = nn.Dropout(embed_dropout)
            self.blocks = nn.ModuleList(Block(d, attn_dropout) for _ in range(layers))
            self.norm_f = nn.LayerNorm(d)
            for name, m in self.named_modules():
                if isinstance(m, nn.Linear):
                    std = 0.02 / math.sqrt(2 * layers) if name.endswith("out_proj") else 0.02
                    nn.init.normal_(m.weight, std=std)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Embedding):
                    nn.init.normal_(m.weight, std=0.02)

        def forward(self, x, mask=None):
            T = x.shape[1]
            h = self.drop(self.embed(x) + self.pos(torch.arange(T, device=x.device))[None])
            r = None
            for blk in self.blocks:
                r = h if r is None else r + h
                r, h = blk(r)
            r = self.norm_f(r + h)
            if mask is not None:   # the head only where the loss looks (as our harness)
                r = r[mask]
            return r @ self.embed.weight.T

    return ZoologyLM


def make_data(vocab, seq_len, kv_pairs, n_train, n_test, data_seed=0):
    """((inputs, labels) train, (inputs, labels) held out) as int64 torch tensors: the data
    of our harness (`mqar_authors_train.datasets`) at these sizes."""
    import torch
    from experiments.mqar_authors_train import datasets
    tr, te = datasets(SimpleNamespace(vocab_size=vocab, seq_len=seq_len, kv_pairs=kv_pairs,
                                      power_a=0.01, train_examples=n_train,
                                      test_examples=n_test, data_seed=data_seed))
    t = lambda a: torch.from_numpy(np.asarray(a, np.int64))  # noqa: E731
    return (t(tr.inputs), t(tr.labels)), (t(te.inputs), t(te.labels))


def accuracy(model, data, batch=128) -> float:
    """Held-out accuracy over the query positions (dropout off)."""
    import torch
    model.eval()
    hit = count = 0
    with torch.no_grad():
        for i in range(0, data[0].shape[0], batch):
            x, y = data[0][i:i + batch], data[1][i:i + batch]
            m = y != IGNORE
            hit += (model(x, m).argmax(-1) == y[m]).sum().item()
            count += m.sum().item()
    model.train()
    return hit / count


def train(a) -> list:
    """The torch model from its own init; returns [{step, loss, acc}] every a.eval_every."""
    import torch
    import torch.nn.functional as F
    torch.manual_seed(a.seed)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    train_set, test = make_data(a.vocab, a.seq_len, a.kv_pairs, a.train_examples,
                                a.test_examples)
    model = _torch_modules()(a.vocab, a.seq_len, a.width, a.layers)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.1)
    N, B = train_set[0].shape[0], a.batch_size
    per_epoch = N // B    # the last partial batch is dropped, as in mqar_authors.py
    order = torch.Generator().manual_seed(1000 + a.seed)
    horizon = a.horizon or a.steps
    curve, losses, t0, perm = [], [], time.perf_counter(), None
    for t in range(a.steps):
        if t % per_epoch == 0:
            perm = torch.randperm(N, generator=order)
        rows = perm[(t % per_epoch) * B:(t % per_epoch + 1) * B]
        for group in opt.param_groups:
            group["lr"] = a.lr * 0.5 * (1 + math.cos(math.pi * min(t, horizon) / horizon))
        x, y = train_set[0][rows], train_set[1][rows]
        m = y != IGNORE
        loss = F.cross_entropy(model(x, m), y[m])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (t + 1) % a.eval_every == 0 or t + 1 == a.steps:
            point = {"step": t + 1, "loss": float(np.mean(losses)), "acc": accuracy(model, test)}
            curve.append(point)
            print(f"step {t + 1} loss {point['loss']:.4f} acc {point['acc']:.4f} "
                  f"({(time.perf_counter() - t0) / (t + 1) * 1e3:.1f} ms/step)", flush=True)
            losses = []
    return curve


def compare(vocab=8192, seq_len=64, kv_pairs=8, width=64, layers=4, rows=64,
            lr=1e-3) -> dict:
    """Our flax AuthorsLM's initial parameters in the torch model; max |difference| of the
    logits at every position, of the query loss, of five gradients and of five parameters
    after one AdamW step (wd 0.1), with the scales they are relative to. float32,
    dropout off."""
    import jax
    import jax.numpy as jnp
    import optax
    import torch
    from experiments.mqar_models import build
    from gsa_jax.optim import loss_sums
    args = SimpleNamespace(vocab_size=vocab, seq_len=seq_len, num_layers=layers,
                           embed_dropout=0.1, attn_dropout=0.1, dtype="float32", impl="auto")
    flax_model = build("attention", width, args)
    (x, y), _ = make_data(vocab, seq_len, kv_pairs, rows, 8)
    xj, yj = jnp.asarray(x.numpy(), jnp.int32), jnp.asarray(y.numpy(), jnp.int32)
    params = flax_model.init({"params": jax.random.key(0)}, xj[:1])["params"]

    tm = _torch_modules()(vocab, seq_len, width, layers)
    as_t = lambda p: torch.from_numpy(np.array(p, np.float32))  # noqa: E731
    state = {"embed.weight": as_t(params["embed"]["embedding"]),
             "pos.weight": as_t(params["pos_embed"]["embedding"]),
             "norm_f.weight": as_t(params["norm_f"]["scale"]),
             "norm_f.bias": as_t(params["norm_f"]["bias"])}
    for i in range(layers):
        for n in ("norm1", "norm2"):
            state[f"blocks.{i}.{n}.weight"] = as_t(params[f"{n}_{i}"]["scale"])
            state[f"blocks.{i}.{n}.bias"] = as_t(params[f"{n}_{i}"]["bias"])
        for n in ("Wqkv", "out_proj"):   # flax kernels are [in, out], torch weights [out, in]
            state[f"blocks.{i}.mixer.{n}.weight"] = as_t(params[f"mixer_{i}"][n]["kernel"]).T
            state[f"blocks.{i}.mixer.{n}.bias"] = as_t(params[f"mixer_{i}"][n]["bias"])
    tm.load_state_dict({k: v.contiguous() for k, v in state.items()})
    tm.eval()
    out = {}
    logits_j = np.asarray(flax_model.apply({"params": params}, xj))
    logits_t = tm(x).detach().numpy()
    out["logits"] = (float(np.abs(logits_j - logits_t).max()), float(np.abs(logits_j).max()))

    # the loss as the harness computes it: logits only at the query positions
    mask = yj != IGNORE
    where = jnp.argsort(~mask, axis=1, stable=True)[:, :kv_pairs]
    y_q = jnp.take_along_axis(yj, where, axis=1)

    def loss_fn(p):
        lg = flax_model.apply({"params": p}, xj, where_BP=where)
        s = loss_sums(lg, jnp.where(y_q == IGNORE, 0, y_q), y_q != IGNORE)
        return s.ce / jnp.maximum(s.count, 1.0)

    loss_j, grads_j = jax.value_and_grad(loss_fn)(params)
    tm.zero_grad()
    loss_t = torch.nn.functional.cross_entropy(
        tm(x).reshape(-1, vocab), y.reshape(-1), ignore_index=IGNORE)
    loss_t.backward()
    out["loss"] = (abs(float(loss_j) - loss_t.item()), loss_t.item())
    last = layers - 1
    picks = {"embed.weight": lambda t: t["embed"]["embedding"],
             "pos.weight": lambda t: t["pos_embed"]["embedding"],
             "blocks.0.mixer.Wqkv.weight": lambda t: t["mixer_0"]["Wqkv"]["kernel"].T,
             f"blocks.{last}.mixer.out_proj.weight":
                 lambda t: t[f"mixer_{last}"]["out_proj"]["kernel"].T,
             f"blocks.{last}.norm2.weight": lambda t: t[f"norm2_{last}"]["scale"]}
    named = dict(tm.named_parameters())
    for name, pick in picks.items():
        g_t = named[name].grad.numpy()
        out["grad " + name] = (float(np.abs(np.asarray(pick(grads_j)) - g_t).max()),
                               float(np.abs(g_t).max()))

    # the harness: optax.adamw(1.0) with the update scaled by the lr
    tx = optax.adamw(1.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1)
    updates, _ = tx.update(grads_j, tx.init(params), params)
    stepped = optax.apply_updates(params, jax.tree.map(lambda u: lr * u, updates))
    torch.optim.AdamW(tm.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                      weight_decay=0.1).step()
    for name, pick in picks.items():
        p_t = named[name].detach().numpy()
        out["after one step " + name] = (float(np.abs(np.asarray(pick(stepped)) - p_t).max()),
                                         float(np.abs(p_t).max()))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["train", "compare"])
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--kv-pairs", type=int, default=8)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-examples", type=int, default=20000)
    p.add_argument("--test-examples", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=3120)
    p.add_argument("--horizon", type=int, default=0, help="cosine horizon (0: --steps)")
    p.add_argument("--eval-every", type=int, default=156)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file for the result")
    a = p.parse_args(argv)
    if a.mode == "compare":
        result = compare(a.vocab, a.seq_len, a.kv_pairs, a.width, a.layers, lr=a.lr)
        for name, (diff, scale) in result.items():
            print(f"{name}: max |ours - torch| {diff:.3e} (scale {scale:.3e})")
    else:
        result = {"config": vars(a), "curve": train(a)}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

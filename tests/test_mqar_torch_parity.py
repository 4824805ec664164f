"""experiments/mqar_torch_parity.py: an independent PyTorch build of Zoology's attention model
and recipe agrees with our MQAR harness (logits, loss, gradients, one AdamW step with weight
decay) from the same parameters; its training mode runs at smoke size. Needs torch (the
`reference` extra)."""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

pytestmark = pytest.mark.reference
torch = pytest.importorskip("torch")

from experiments import mqar_torch_parity as mtp  # noqa: E402


def test_torch_build_equals_our_model_and_optimizer_step():
    lr = 0.1   # large enough that AdamW's decoupled weight decay (lr * 0.1 * p) shows in the step
    result = mtp.compare(vocab=64, seq_len=16, kv_pairs=2, width=16, layers=2, rows=8, lr=lr)
    diff, scale = result["logits"]
    assert scale > 0.1 and diff <= 1e-5 * scale
    diff, loss = result["loss"]
    assert abs(loss - math.log(64)) < 0.5 and diff <= 1e-5 * loss   # near the uniform guess
    grads = [k for k in result if k.startswith("grad ")]
    assert len(grads) == 5
    for k in grads:
        diff, scale = result[k]
        assert scale > 0 and diff <= 1e-4 * scale, (k, diff, scale)
    for k in (k for k in result if k.startswith("after one step ")):
        diff, scale = result[k]
        # a step moves every entry by ~lr (Adam's first step); weight decay moves the LayerNorm
        # scale (1.0) by lr * 0.1 = 0.01 more: both far above this bound
        assert diff <= 1e-3 * lr, (k, diff)


def test_train_mode_smoke(tmp_path):
    out = tmp_path / "curve.json"
    assert mtp.main(["train", "--vocab", "32", "--seq-len", "16", "--kv-pairs", "2",
                     "--width", "16", "--layers", "2", "--batch-size", "8",
                     "--train-examples", "64", "--test-examples", "16", "--steps", "12",
                     "--eval-every", "4", "--lr", "3e-3", "--out", str(out)]) == 0
    curve = json.loads(out.read_text())["curve"]
    assert [p["step"] for p in curve] == [4, 8, 12]
    assert all(np.isfinite(p["loss"]) and 0 <= p["acc"] <= 1 for p in curve)

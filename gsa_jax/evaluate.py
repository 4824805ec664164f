"""Validation loss and perplexity: during training every N steps, and standalone on a checkpoint.

    val_loss = Σ_tokens CE / #tokens over the validation windows scored (mean nats per token)
    val_ppl  = exp(val_loss)            val_bpt = val_loss / ln 2 (bits per token; per byte
                                        for the byte tokenizer)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

from jax.sharding import Mesh

from gsa_jax import steps
from gsa_jax.data import sequential_batches


def evaluate(eval_step: Callable, params: Any, batches: Iterable[dict], mesh: Mesh,
             progress: Optional[Any] = None) -> dict:
    """Mean loss over the masked tokens of `batches` (host NumPy batches, see data.loader).

    progress: a tqdm-like bar, advanced by one per batch scored."""
    total = count = 0.0          # Python floats: float64 accumulation
    pending = None
    for batch in batches:
        result = eval_step(params, steps.device_batch(batch, mesh))   # async dispatch
        if pending is not None:  # fetch the previous batch while this one runs
            total, count = total + float(pending[0]), count + float(pending[1])
            if progress is not None:
                progress.update(1)
        pending = result
    if pending is not None:
        total, count = total + float(pending[0]), count + float(pending[1])
        if progress is not None:
            progress.update(1)
    if count == 0:
        raise ValueError("evaluate: no validation tokens (is the validation set shorter than "
                         "one sequence?)")
    loss = total / count
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_bpt": loss / math.log(2),
            "val_tokens": int(count)}


def validation_batches(session, max_batches: Optional[int] = -1) -> Iterable[dict]:
    """The session's validation batches (max_batches -1: the config's eval.batches; None: all)."""
    cfg = session.config
    if session.data.val is None:
        raise ValueError("no validation data (data.val_path, or data.val_fraction > 0 for "
                         "the stdlib source)")
    limit = cfg.eval.batches if max_batches == -1 else max_batches
    return sequential_batches(session.data.val, batch_size=cfg.eval.batch_size or
                              cfg.data.batch_size, seq_len=cfg.data.seq_len,
                              bos_id=session.data.bos_id, max_batches=limit)


def evaluate_checkpoint(config, step: Optional[int] = None,
                        max_batches: Optional[int] = None, progress: bool = False) -> dict:
    """Standalone evaluation of a run's checkpoint (default: the newest intact one) on its
    validation data.

    max_batches None: the whole validation set. progress: a progress bar on stderr.
    Returns the metrics plus "step"."""
    from gsa_jax import session as session_lib  # session imports the steps; keep this light
    # The validation split and the checkpoint's params only: no training data, no optimizer.
    session = session_lib.build(config, read_only=True, splits=("validation",))
    try:
        params, meta = session_lib.restore_params(session, step)
    finally:
        session.checkpointer.close()
    batches = validation_batches(session, max_batches)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(batches), unit="batch", desc="eval", dynamic_ncols=True)
    try:
        metrics = evaluate(session.eval_step, params, batches, session.mesh, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    return {"step": int(meta["step"]), **metrics}

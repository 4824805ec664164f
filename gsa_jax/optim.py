"""Optimisation as in the paper (GLA recipe): AdamW, linear warmup + cosine decay, global-norm
gradient clipping, and the language-modelling loss in float32 with an optional z-loss.

Mixed precision needs nothing here: the model's `dtype` (e.g. bfloat16) is its compute dtype and
`param_dtype` (float32) the master copy that the optimizer updates; gradients arrive in float32.

Weight decay (our choice, the common practice of Megatron / OLMo / the GPT-NeoX family): decay
every matrix (ndim >= 2, not counting the layer axis of scanned layers: projections, MLP, LM
head, short-conv kernels); never decay vectors
(norm scales, biases, the data-independent gate logits); the input embedding table is not
decayed unless `decay_embeddings` (nanoGPT and HF's Trainer decay it; OLMo does not).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gsa_jax import checks

SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW + schedule. Paper (1.3B/2.7B): lr 3e-4, cosine, weight decay 0.01, clip 1.0."""
    lr: float = 3e-4               # peak learning rate
    schedule: str = "cosine"       # after warmup: cosine | linear (decay to min_lr_ratio·lr) | constant
    warmup_steps: int = 100        # linear warmup from 0 to lr
    min_lr_ratio: float = 0.1      # final lr = min_lr_ratio · lr
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.01     # decoupled (AdamW), multiplied by the current lr
    decay_embeddings: bool = False
    grad_clip: float = 1.0         # max global gradient norm; 0 = no clipping
    z_loss: float = 0.0            # coefficient of log(Z)² added to the loss (PaLM uses 1e-4)
    grad_accum: int = 1            # micro-batches per optimizer step (the batch is split)

    def __post_init__(self):
        def fail(msg):
            raise ValueError(f"optim: {msg}")
        checks.check_positive("optim", "lr", self.lr)
        checks.check_choice("optim", "schedule", self.schedule, SCHEDULES)
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            fail(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            fail(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            fail(f"b1, b2 must be in [0, 1), got {self.b1!r}, {self.b2!r}")
        checks.check_positive("optim", "eps", self.eps)
        for name in ("weight_decay", "grad_clip", "z_loss"):
            if not getattr(self, name) >= 0:
                fail(f"{name} must be >= 0, got {getattr(self, name)!r}")
        checks.check_positive_int("optim", "grad_accum", self.grad_accum, numpy_ints=False)


def make_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    """lr(step): 0 → lr linearly over warmup_steps, then to min_lr_ratio·lr at total_steps."""
    peak, end = config.lr, config.lr * config.min_lr_ratio
    warmup = min(config.warmup_steps, total_steps)
    if config.schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(peak)
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup),
                                     optax.constant_schedule(peak)], [warmup])
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1),
                                                  end_value=end)
    decay = optax.linear_schedule(peak, end, max(total_steps - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def weight_decay_mask(params: Any, decay_embeddings: bool = False) -> Any:
    """True for the parameters that are decayed (see the module docstring)."""
    def decide(path, leaf):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        # Scanned layers stack every block's params on a leading [L] axis: a stacked vector is
        # still a vector (gsa_jax.layer_layout.STACK).
        ndim = leaf.ndim - 1 if "layers" in keys else leaf.ndim
        if ndim < 2:
            return False
        if not decay_embeddings and "embedding" in keys:  # flax nn.Embed's table
            return False
        return True
    return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(config: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                   optax.Schedule]:
    """(clip → AdamW with the schedule and the decay mask, schedule)."""
    schedule = make_schedule(config, total_steps)
    parts = []
    if config.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip))
    parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                             weight_decay=config.weight_decay,
                             mask=lambda p: weight_decay_mask(p, config.decay_embeddings)))
    return optax.chain(*parts), schedule


class LossSums(NamedTuple):
    """Sums over the (masked) tokens of a batch; divide by `count` for means. float32 scalars.

    Sums, not means, so that micro-batches add up to exactly the large batch's loss.
    """
    total: jax.Array    # Σ mask · (CE + z_loss · log(Z)²), what is differentiated
    ce: jax.Array       # Σ mask · CE
    z: jax.Array        # Σ mask · log(Z)²
    count: jax.Array    # Σ mask


def loss_sums(logits: jax.Array, targets: jax.Array, mask: jax.Array,
              z_loss: float = 0.0) -> LossSums:
    """Next-token cross-entropy in float32.

    logits: [B, T, V] (any float dtype; upcast here: log-softmax over 32K classes in bf16 loses
      about two digits); targets: [B, T] int; mask: [B, T] float (0 on padding).
    """
    logits = logits.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)                                   # [B, T]
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32),
                                       axis=-1)[..., 0]                       # [B, T]
    ce = log_z - target_logit
    z2 = jnp.square(log_z)
    return LossSums(total=jnp.sum(mask * (ce + z_loss * z2)), ce=jnp.sum(mask * ce),
                    z=jnp.sum(mask * z2), count=jnp.sum(mask))

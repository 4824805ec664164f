"""The block plan of the TPU (Mosaic) GLA kernels: layouts, BlockSpecs, VMEM budget and cost.

Grid (B, H, N). Batch and query head are "parallel" (chips with two TensorCores split them);
the N chunks are "arbitrary": a core walks them in order and carries the float32 state from
one grid step to the next in a VMEM scratch buffer (set from the initial state at the first
chunk, written out as the final state at the last). The backward walks the chunks in reverse
(block index N − 1 − n). Mosaic double-buffers every block: the DMA of chunk n + 1 overlaps the
work on chunk n.

Each grid step sees one chunk of a sequence operand as a [C, D] tile. Mosaic tiles the last
two dims of a block by (8, 128) for 32-bit and (16, 128) for 16-bit elements, unless the block
takes the whole dim, so an operand [B, T, heads, D] reaches the kernels in one of two layouts:
- time-major [B, Tp, heads·D], a free reshape: block [C, D] at column block `head`. Needs
  D % 128 == 0 (q, k, v at K = V = 128) or a single head.
- head-major [B, heads, Tp, D], one XLA transpose in and out: block [C, D] with D whole, any D
  (GSA's M = 64 slots).
C is a multiple of 16 (the chunk sizes 16..128 are). A state is one whole block [W0, W1]
(W0 = K or V, tpu_chunk_math's layout); the chunk states [B, H, N·W0, W1] take blocks
[W0, W1] at row block n, so W0 must be a multiple of 16.

VMEM per grid step (`vmem_bytes`; the padded tiles of every double-buffered block, the scratch
state and an allowance for the kernel's float32 temporaries), GSA at chunk 64 with K = V = 128,
M = 64, bf16 inputs, chunk states kept, with segments (`python -m pallas_kernels.tpu_plan`):

    | pass (state)          | forward  | backward  |
    |-----------------------|----------|-----------|
    | 1: Hk [128, 64]       | 1.10 MiB | 1.57 MiB  |
    | 2: Hvᵀ [128, 64]      | 1.07 MiB | 1.54 MiB  |

against SCOPED_VMEM_BYTES = 16 MiB, the default scoped VMEM limit of v4 and v5e, the smallest
of the current generations (physical VMEM per TensorCore: v4 16 MiB, v5e 128 MiB, v5p 64 MiB,
v6e 128 MiB, 7x 64 MiB: jax/_src/pallas/mosaic/tpu_info.py of jax 0.10.2; the 16 MiB default
scoped limit of v4/v5e and 32 MiB of v6e: XLA's --xla_tpu_scoped_vmem_limit_kib). The widest
shapes the kernels take without slicing need at most 7.2 MiB (K = V = 256, chunk 128, float32,
backward; tests/test_pallas_tpu.py checks every one against the 16 MiB).

Cost per token (`flops_per_token`, `hbm_bytes_per_token`, `gsa_cost`; the roofline in the
README's "TPU" section): matmul FLOPs of the fast path and the bytes every block moves, both
checked against the traced kernels; plus XLA's layout transposes around the kernels.
"""

from __future__ import annotations

import dataclasses

from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
SCOPED_VMEM_BYTES = 16 * 2**20
F32 = 4


def sublanes(itemsize: int) -> int:
    """Rows of one Mosaic tile for elements of this many bytes (32-bit: 8, 16-bit: 16)."""
    return 8 * (4 // itemsize)


def tile_bytes(rows: int, cols: int, itemsize: int) -> int:
    """VMEM bytes of a [rows, cols] block, padded to Mosaic's (sublanes, 128) tiling."""
    s = sublanes(itemsize)
    return -(-rows // s) * s * (-(-cols // LANES) * LANES) * itemsize


def time_major(D: int, heads: int) -> bool:
    """Whether a [B, T, heads, D] operand can be blocked as it lies (see the module doc)."""
    return D % LANES == 0 or heads == 1


@dataclasses.dataclass(frozen=True)
class Plan:
    """Shapes of one kernel call (T padded to Tp = N·C) and everything derived from them."""

    B: int
    Tp: int
    H: int  # query heads
    Hkv: int  # key/value heads (grouped: H = group · Hkv)
    K: int
    V: int
    C: int
    key_gated: bool
    itemsize: int  # bytes of an input element (q, k, v, g, do)
    out_itemsize: int  # bytes of an output element
    sub: int = 0  # the sub-chunk tier's size for tiles past the chunk bound (0: exact loop)

    @property
    def N(self) -> int:
        return self.Tp // self.C

    @property
    def group(self) -> int:
        return self.H // self.Hkv

    @property
    def Dg(self) -> int:
        return self.K if self.key_gated else self.V

    @property
    def state_shape(self) -> tuple:
        """[W0, W1]: the state with its gated axis last (Sᵀ for the key gate)."""
        return (self.V, self.K) if self.key_gated else (self.K, self.V)

    @property
    def grid(self) -> tuple:
        return (self.B, self.H, self.N)

    def compiler_params(self):
        return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))

    # -- layouts and BlockSpecs ------------------------------------------------------------

    def to_kernel(self, x):
        """[B, Tp, heads, D] -> the operand's kernel layout (time- or head-major)."""
        B, Tp, heads, D = x.shape
        if time_major(D, heads):
            return x.reshape(B, Tp, heads * D)
        return x.transpose(0, 2, 1, 3)

    def from_kernel(self, y, D: int):
        """Inverse of `to_kernel` for an output with query heads: -> [B, Tp, H, D]."""
        if time_major(D, self.H):
            return y.reshape(self.B, self.Tp, self.H, D)
        return y.transpose(0, 2, 1, 3)

    def out_shape(self, D: int) -> tuple:
        """Kernel-layout shape of a [B, Tp, H, D] output."""
        if time_major(D, self.H):
            return (self.B, self.Tp, self.H * D)
        return (self.B, self.H, self.Tp, D)

    def _chunk(self, n, reverse: bool):
        return self.N - 1 - n if reverse else n

    def seq(self, D: int, kv: bool, reverse: bool = False):
        """[C, D] block of chunk n of a sequence operand with query heads or (kv) grouped ones."""
        heads, G = (self.Hkv, self.group) if kv else (self.H, 1)
        # lax.div, not //: a floor division of a traced int lowers through `sign`, which Mosaic
        # lowers per TPU generation (and heads are never negative)
        if time_major(D, heads):
            return pl.BlockSpec((None, self.C, D),
                                lambda b, h, n: (b, self._chunk(n, reverse), lax.div(h, G)))
        return pl.BlockSpec((None, None, self.C, D),
                            lambda b, h, n: (b, lax.div(h, G), self._chunk(n, reverse), 0))

    def rel_col(self, reverse: bool = False):
        """[C, 1] block of the relative segment runs [B, Tp, 1]."""
        return pl.BlockSpec((None, self.C, 1), lambda b, h, n: (b, self._chunk(n, reverse), 0))

    def rel_row(self, reverse: bool = False):
        """[1, C] block of the relative segment runs [B, N, 1, C]."""
        return pl.BlockSpec((None, None, 1, self.C),
                            lambda b, h, n: (b, self._chunk(n, reverse), 0, 0))

    def state(self):
        """The whole [W0, W1] state of (b, h) in [B, H, W0, W1]; the same block at every n."""
        W0, W1 = self.state_shape
        return pl.BlockSpec((None, None, W0, W1), lambda b, h, n: (b, h, 0, 0))

    def states(self, reverse: bool = False):
        """[W0, W1] block of chunk n in the per-chunk states [B, H, N·W0, W1]."""
        W0, W1 = self.state_shape
        return pl.BlockSpec((None, None, W0, W1),
                            lambda b, h, n: (b, h, self._chunk(n, reverse), 0))

    # -- VMEM budget ------------------------------------------------------------------------

    def blocks(self, kernel: str, *, segments: bool = True) -> list:
        """(rows, cols, itemsize) of every pipelined block of one grid step, in the kernel's
        operand order. kernel: "forward" (outputs and chunk states), "states" or "backward"."""
        C, K, V, Dg, it = self.C, self.K, self.V, self.Dg, self.itemsize
        W0, W1 = self.state_shape
        q = [(C, K, it)] if kernel != "states" else []
        seq = q + [(C, K, it), (C, V, it), (C, Dg, it)]  # (q,) k, v, g
        if segments:
            seq += [(C, 1, F32), (1, C, F32)]
        if kernel == "backward":
            grad = F32 if self.group > 1 else it
            do = (C, V, self.out_itemsize)  # the cotangent has the output's dtype
            return seq + [(W0, W1, it), do, (W0, W1, F32),  # chunk state, do, dsT
                          (C, K, it), (C, K, grad), (C, V, grad), (C, Dg, grad),  # dq dk dv dg
                          (W0, W1, F32)]  # ds0
        o = [(C, V, self.out_itemsize)] if kernel == "forward" else []
        return seq + [(W0, W1, F32)] + o + [(W0, W1, it), (W0, W1, F32)]  # s0, o, states, sT

    def vmem_bytes(self, kernel: str, *, segments: bool = True) -> int:
        """VMEM of one grid step: 2 buffers of every block, the scratch state and float32
        temporaries (an allowance: 8 [C, D] and 3 [C, C] tiles live in the forward, 16 and 4
        in the backward, D the widest feature dim; Mosaic's own allocation is known only on a
        TPU)."""
        C, D = self.C, max(self.K, self.V, self.Dg)
        state = tile_bytes(*self.state_shape, F32)
        wide, square, states = (16, 4, 3) if kernel == "backward" else (8, 3, 2)
        temporaries = (wide * tile_bytes(C, D, F32) + square * tile_bytes(C, C, F32)
                       + states * state)
        pipelined = sum(tile_bytes(*b) for b in self.blocks(kernel, segments=segments))
        return 2 * pipelined + state + temporaries

    # -- cost per token (per query head), fast path -----------------------------------------

    def flops_per_token(self, kernel: str) -> float:
        """Matmul FLOPs per token of the kernel's fast path (2·m·n·k per matmul).

        forward: gate cumsum L g (2C·Dg), scores and intra output (2C·(K + V)), state read
        and write (4·K·V). states: the cumsum and the state write. backward: both cumsums
        (4C·Dg), the intra gradients (2C·(3K + 2V) on the key gate, 2C·(3K + 3V) on the value
        gate, which also re-forms the intra output), the state terms (6 or 8 K·V) and the
        state gradient (2 K·V)."""
        C, K, V, Dg = self.C, self.K, self.V, self.Dg
        if kernel == "forward":
            return 2 * C * (Dg + K + V) + 4 * K * V
        if kernel == "states":
            return 2 * C * Dg + 2 * K * V
        if self.key_gated:
            return 4 * C * Dg + 2 * C * (3 * K + 2 * V) + 8 * K * V
        return 4 * C * Dg + 2 * C * (3 * K + 3 * V) + 10 * K * V

    def hbm_bytes_per_token(self, kernel: str, *, keep_states: bool = True,
                            segments: bool = False) -> float:
        """Bytes the kernel moves between HBM and VMEM per token and query head: each chunk
        block once (grouped k, v, g once per query head), the chunk states once per chunk,
        initial and final states once per sequence. Layout transposes (`layout_bytes`) are
        XLA's and not included."""
        C, K, V, Dg, it = self.C, self.K, self.V, self.Dg, self.itemsize
        W0, W1 = self.state_shape
        per_chunk_state = W0 * W1 * it / C
        per_sequence_states = 2 * W0 * W1 * F32 / self.Tp
        seq = (K + V + Dg) * it + (8 if segments else 0)  # k, v, g (+ both run layouts)
        if kernel == "forward":
            return (seq + K * it + V * self.out_itemsize + per_sequence_states
                    + (per_chunk_state if keep_states else 0))
        if kernel == "states":
            return seq + per_chunk_state + per_sequence_states
        grad = F32 if self.group > 1 else it
        return (seq + K * it + V * self.out_itemsize + per_chunk_state  # + q, do, states
                + per_sequence_states + K * it + (K + V + Dg) * grad)  # dq, dk, dv, dg


    def cost_estimate(self, kernel: str, *, keep_states: bool, segments: bool):
        """pallas_call's cost hint for XLA's scheduler: matmul FLOPs, exponentials (about 4
        [C, Dg] tiles per chunk forward, 8 backward) and HBM bytes of the whole call."""
        tokens = self.B * self.Tp * self.H
        return pl.CostEstimate(
            flops=int(tokens * self.flops_per_token(kernel)),
            transcendentals=int(tokens * self.Dg * (8 if kernel == "backward" else 4)),
            bytes_accessed=int(tokens * self.hbm_bytes_per_token(
                kernel, keep_states=keep_states, segments=segments)))

    def layout_bytes_per_token(self, kernel: str) -> float:
        """Bytes per token and query head that XLA's layout transposes move around the
        kernel: each head-major operand read and written once on its way in or out (an upper
        bound: XLA may share a transpose between the two GSA passes)."""
        it, out, K, V, Dg = self.itemsize, self.out_itemsize, self.K, self.V, self.Dg
        kv = self.Hkv
        seq = [(K, self.H, it), (K, kv, it), (V, kv, it), (Dg, kv, it)]  # q, k, v, g
        if kernel == "forward":
            seq.append((V, self.H, out))  # o
        else:  # do in; dq, dk, dv, dg out (float32 where grouped heads are summed)
            grad = F32 if self.group > 1 else it
            seq += [(V, self.H, out), (K, self.H, it), (K, self.H, grad), (V, self.H, grad),
                    (Dg, self.H, grad)]
        return sum(2 * D * size * heads / self.H for D, heads, size in seq
                   if not time_major(D, heads))


# Peak dense bf16 FLOP/s and HBM bandwidth (bytes/s) per chip, as Google publishes them
# (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e and tpu7x; the same figures are in jax's
# jax/_src/pallas/mosaic/tpu_info.py).
TPU_CHIPS = {"v4": (275e12, 1.2e12), "v5e": (197e12, 819e9), "v5p": (459e12, 2765e9),
             "v6e": (918e12, 1640e9), "7x (Ironwood)": (2307e12, 7370e9)}


_DEVICE_KINDS = {"TPU v4": "v4", "TPU v5e": "v5e", "TPU v5 lite": "v5e", "TPU v5": "v5p",
                 "TPU v5p": "v5p", "TPU v6e": "v6e", "TPU v6 lite": "v6e", "TPU7": "7x (Ironwood)",
                 "TPU7x": "7x (Ironwood)"}


def chip_of(device_kind: str):
    """The TPU_CHIPS key of a jax device_kind ("TPU v5 lite" -> "v5e"), None if unknown."""
    return _DEVICE_KINDS.get(device_kind)


def gsa_roofline_ms(chip: str, *, B: int, T: int, H: int, K: int, V: int, M: int, C: int = 64,
                    itemsize: int = 2, backward: bool = True) -> float:
    """Roofline time of GSA on one chip: the larger of compute and HBM time (kernels' and
    XLA's bytes around them), at the chip's published peaks."""
    peak, bandwidth = TPU_CHIPS[chip]
    c = gsa_cost(T=T, H=H, K=K, V=V, M=M, C=C, itemsize=itemsize, backward=backward)
    return B * T * max(c["flops"] / peak, (c["kernel_bytes"] + c["xla_bytes"]) / bandwidth) * 1e3


def gsa_cost(*, T: int, H: int, K: int, V: int, M: int, C: int = 64, itemsize: int = 2,
             backward: bool = True) -> dict:
    """FLOPs and HBM bytes per token (all H heads) of GSA's two passes on the TPU kernels,
    chunk states kept: {"flops", "kernel_bytes", "xla_bytes"}; xla_bytes are the layout
    transposes and the slot softmax between the passes (read z in float32, write p; the
    backward reads p, dp and writes dz)."""
    passes = [Plan(B=1, Tp=T, H=H, Hkv=H, K=K, V=M, C=C, key_gated=False, itemsize=itemsize,
                   out_itemsize=F32),
              Plan(B=1, Tp=T, H=H, Hkv=H, K=M, V=V, C=C, key_gated=True, itemsize=itemsize,
                   out_itemsize=itemsize)]
    kernels = ("forward", "backward") if backward else ("forward",)
    flops = sum(p.flops_per_token(k) for p in passes for k in kernels)
    kernel_bytes = sum(p.hbm_bytes_per_token(k) for p in passes for k in kernels)
    xla_bytes = sum(p.layout_bytes_per_token(k) for p in passes for k in kernels)
    xla_bytes += M * (F32 + itemsize) + (M * (2 * itemsize + F32) if backward else 0)
    return {name: H * value for name, value in
            (("flops", flops), ("kernel_bytes", kernel_bytes), ("xla_bytes", xla_bytes))}


def main():
    """Print the VMEM table of the module docstring and the README's roofline table."""
    for name, (K, V, key_gated) in {"1: Hk [128, 64]": (128, 64, False),
                                    "2: Hvᵀ [128, 64]": (64, 128, True)}.items():
        plan = Plan(B=1, Tp=2048, H=16, Hkv=16, K=K, V=V, C=64, key_gated=key_gated,
                    itemsize=2, out_itemsize=4 if not key_gated else 2)
        fwd, bwd = (plan.vmem_bytes(k) / 2**20 for k in ("forward", "backward"))
        print(f"| {name:21s} | {fwd:.2f} MiB | {bwd:.2f} MiB  |")
    B, T, H, K, M = 8, 2048, 16, 128, 64
    print(f"\nGSA B={B} T={T} H={H} K=V={K} M={M}, chunk 64, bf16: per token")
    costs = {name: gsa_cost(T=T, H=H, K=K, V=K, M=M, backward=name != "forward")
             for name in ("forward", "forward+backward")}
    for name, c in costs.items():
        print(f"  {name}: {c['flops'] / 1e6:.2f} MFLOP, kernels {c['kernel_bytes'] / 1e3:.1f} KB"
              f" + XLA around them {c['xla_bytes'] / 1e3:.1f} KB")
    print("| chip | fwd: compute / kernels' HBM / + XLA's HBM (ms) | "
          "fwd+bwd: compute / kernels' HBM / + XLA's HBM (ms) |")
    for chip, (peak, bw) in TPU_CHIPS.items():
        ms = B * T * 1e3
        cells = [f"{ms * c['flops'] / peak:.2f} / {ms * c['kernel_bytes'] / bw:.2f}"
                 f" / {ms * (c['kernel_bytes'] + c['xla_bytes']) / bw:.2f}"
                 for c in costs.values()]
        print(f"| {chip} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

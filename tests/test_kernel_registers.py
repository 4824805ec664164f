"""experiments/kernel_registers.py: the GPU kernels' Triton IR lowered on the CPU, and (with
the pip triton of the reference extra) their registers and spills read by ptxas."""

from __future__ import annotations

import json

import pytest

from experiments import kernel_registers as kr
from pallas_kernels import gla as pgla

SHAPE = (1, 128, 2, 32, 16, 32)   # B, T, H, K, M, V: 2 chunks of 64, 2 (batch, head) programs


def test_every_kernel_of_a_training_step_is_lowered_with_its_launch():
    """Forward + backward: the four GLA kernels of each pass, each with the warps and stages of
    the tuning in force (a variant's changes reach them); --fast-only cuts the intra-chunk
    branches (scf.if in the IR) out of the kernels that have them."""
    kernels = kr.lower_kernels(SHAPE, {"warps_seq": 2, "warps_par": 4, "stages": 1,
                                       "strong_gates_apart": False},
                               forward_only=False, fast_only=False)
    names = [k[0] for k in kernels]
    assert sorted(set(names)) == ["gla_dstates_bwd", "gla_grads_bwd", "gla_output_fwd",
                                  "gla_states_fwd"], names
    launch = {name: (warps, stages) for name, warps, stages, _ in kernels}
    assert launch["gla_states_fwd"] == launch["gla_dstates_bwd"] == (2, 1)
    assert launch["gla_grads_bwd"] == launch["gla_output_fwd"] == (4, 1)
    assert all("tt.func public @" + name in text for name, _, _, text in kernels)
    branched = {name for name, _, _, text in kernels if "scf.if" in text}
    assert {"gla_output_fwd", "gla_grads_bwd"} <= branched
    fast = kr.lower_kernels(SHAPE, {"strong_gates_apart": False}, forward_only=False,
                            fast_only=True)
    assert not any("scf.if" in text for name, _, _, text in fast
                   if name in ("gla_output_fwd", "gla_grads_bwd"))
    assert pgla.current_tuning() == pgla.Tuning()   # the variant was undone


def test_strong_gates_apart_takes_the_branches_out_of_the_hot_kernels():
    """`strong_gates_apart`: the fused walk, the output kernel and the gradient kernel lower
    with no branch (scf.if) left in them, and each pass gets a strong-path kernel (forward and
    backward) that holds the branch; without it the hot kernels hold it. The default takes
    them apart on the value-gated pass (the first) only."""
    hot = ("gla_fused_fwd", "gla_output_fwd", "gla_grads_bwd")
    for forward_only in (True, False):
        apart = kr.lower_kernels(SHAPE, {"strong_gates_apart": True},
                                 forward_only=forward_only, fast_only=False)
        names = [k[0] for k in apart]
        strong = ["gla_strong_intra_fwd"] if forward_only else ["gla_strong_intra_bwd",
                                                                "gla_strong_intra_fwd"]
        assert sorted(set(names) - {"gla_fused_fwd", "gla_output_fwd", "gla_grads_bwd",
                                    "gla_states_fwd", "gla_dstates_bwd"}) == strong, names
        assert all(names.count(name) == 2 for name in strong), names   # one per GSA pass
        assert not any("scf.if" in text for name, _, _, text in apart if name in hot)
        assert all("scf.if" in text for name, _, _, text in apart if name in strong)
        together = kr.lower_kernels(SHAPE, {"strong_gates_apart": False},
                                    forward_only=forward_only, fast_only=False)
        assert all("scf.if" in text for name, _, _, text in together if name in hot)
        default = [k[0] for k in kr.lower_kernels(SHAPE, {}, forward_only=forward_only,
                                                  fast_only=False)]
        assert all(default.count(name) == 1 for name in strong), default


SASS = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0020*/                   LDS R2, [R0] ;
        /*0030*/                   FFMA R3, R2, R2, R3 ;
        /*0040*/                   MUFU.EX2 R4, R3 ;
        /*0050*/                   HGMMA.64x64x16.F32.BF16 R8, gdesc[UR4], R8 ;
        /*0060*/               @!P0 FADD R3, R3, R4 ;
        /*0070*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0080*/                   ISETP.GE.AND P0, PT, R0, 0x10, PT ;
        /*0090*/               @P0 BRA `(.L_x_0) ;
.L_x_1:
        /*00a0*/                   STG.E [R6.64], R3 ;
        /*00b0*/                   @P1 BRA `(.L_x_1) ;
        /*00c0*/                   EXIT ;
"""


def test_sass_mix_counts_the_main_loop_by_class():
    """A hand-written SASS listing: 13 instructions, the main loop (the longest span a
    backward branch closes) is the 8 from .L_x_0 to its branch; predicated instructions
    count under their opcode."""
    mix = kr.sass_mix(SASS)
    assert mix["instructions"] == 13
    assert mix["by_class"] == {"fp32": 2, "mufu": 1, "tensor": 1, "smem_sync": 2,
                               "int_addr": 3, "convert": 0, "global": 1, "local": 0,
                               "other": 3}   # two branches and the exit
    assert mix["loop_instructions"] == 8
    assert mix["loop_by_class"] == {"fp32": 2, "mufu": 1, "tensor": 1, "smem_sync": 2,
                                    "int_addr": 1, "convert": 0, "global": 0, "local": 0,
                                    "other": 1}   # the branch
    assert mix["loads"] == {"async": 0, "plain": 0}   # one global store, no load


def test_global_loads_by_kind():
    """cp.async (LDGSTS, with its cache-policy suffixes) and TMA copies count as async loads,
    LDG (any width) as plain ones; stores, shared loads and the cp.async fences count as
    neither."""
    added = ["LDGSTS.E.BYPASS.LTC128B.128 [R2], desc[UR6][R4.64] ;", "LDGDEPBAR ;",
             "UTMALDG.2D [UR8], [UR4] ;", "LDG.E.128 R12, desc[UR6][R4.64] ;",
             "LDG.E R13, desc[UR6][R4.64] ;"]
    listing = SASS.replace("LDS R2, [R0] ;", "".join(
        f"{op}\n        /*002{i}*/                   " for i, op in enumerate(added, 1))
        + "LDS R2, [R0] ;")
    assert kr.sass_mix(listing)["loads"] == {"async": 2, "plain": 2}


@pytest.mark.reference
def test_registers_and_spills_from_ptxas(tmp_path):
    """Compiled by pip triton (the reference extra) for sm_90: every row within the hardware's
    limits (registers <= 65536 / threads and <= 255, shared memory <= 227 KiB); a state walk
    given one warp for a 128 x 128 float32 state (512 values per thread) must spill, and the
    same walk with 8 warps spills less."""
    pytest.importorskip("triton")
    shape = ["1", "128", "2", "128", "128", "128"]
    kr.main(["--tag", "test", "--out-dir", str(tmp_path), "--shape", *shape,
             "--forward-only", "--variant", 'one={"warps_seq": 1, "fused_forward": false}',
             "--variant", 'eight={"warps_seq": 8, "fused_forward": false}'])
    rows = json.loads((tmp_path / "kernel_registers_test.json").read_text())["rows"]
    assert {r["variant"] for r in rows} == {"one", "eight"}
    for r in rows:
        threads = 32 * r["num_warps"]
        assert 0 < r["registers"] <= min(255, 65536 // threads), r
        assert r["shared_bytes"] <= 227 * 1024, r
        assert 0 < r["loop_instructions"] < r["instructions"], r
    walk = {r["variant"]: r for r in rows if r["kernel"] == "gla_states_fwd"}
    assert walk["one"]["num_warps"] == 1 and walk["one"]["spill_stores"] > 512, walk
    assert walk["eight"]["spill_stores"] < walk["one"]["spill_stores"], walk
    # the walk's loop holds a chunk's state update on the tensor cores, and the spilled
    # values go through local memory inside it
    for r in walk.values():
        assert r["loop_by_class"]["tensor"] > 0 and r["loop_by_class"]["fp32"] > 0, r
    assert walk["one"]["loop_by_class"]["local"] > walk["eight"]["loop_by_class"]["local"]
    assert "| gla_states_fwd |" in (tmp_path / "kernel_registers_test.md").read_text()


def test_backward_key_blocks_lower_to_triton():
    """`block_k_bwd`: the gradient kernel in key blocks lowers to Triton IR (pass 1's K = 32
    and pass 2's key dim M = 16 in blocks of 16); its tiles are [C, 16] where they were
    [C, 32] (pass 1's q and k)."""
    whole = kr.lower_kernels(SHAPE, {}, forward_only=False, fast_only=True)
    blocked = kr.lower_kernels(SHAPE, {"block_k_bwd": 16}, forward_only=False, fast_only=True)
    grads = lambda ks: [text for name, _, _, text in ks if name == "gla_grads_bwd"]
    assert len(grads(whole)) == len(grads(blocked)) == 2
    assert "tensor<64x32xbf16" in grads(whole)[-1]
    assert "tensor<64x32xbf16" not in grads(blocked)[-1]
    assert "tensor<64x16xbf16" in grads(blocked)[-1]

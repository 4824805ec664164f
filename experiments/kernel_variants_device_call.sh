#!/bin/bash
# One device call that times the kernels' launch variants against the default, shape by shape,
# within a deadline, then runs their float64 tests on the GPU: the defaults before the H100
# timing of 2026-12-06 (no in-kernel combine, no strong tiles apart, one gradient kernel), strong
# tiles apart on both passes, the gradient kernel split on both, cumulative_gates (measured
# slower on an H100): what an H200 should confirm or overturn.
#
#   bash experiments/kernel_variants_device_call.sh [SECONDS] [SHAPES...]
#     e.g. (device tool, no carry)
#          bash experiments/kernel_variants_device_call.sh 560 6 0 5
#
# SECONDS: the whole command's budget (default 560): a shape starts only with 60 s left for
# it, the tests run only with 30 s left. SHAPES: bench_kernels.py indices (default 6 0 5:
# 1 x 16384, 8 x 2048, 8 x 2048 at M = 128). Each shape's rows are merged into
# $OUT/bench_kernels_$VARIANT_TAG.{json,md} (default <gpu>var, gpu: h200 or h100; a tag of
# its own, e.g. VARIANT_TAG=h100var7, needs no renaming afterwards), each variant's outputs and
# gradients checked against the default row's in the same process (VARIANT_SET=near: other
# variants, below); $OUT also gets bench.log
# and pytest.log. --no-check: the default row is not compared with the f32 chunk form again.
set -u -o pipefail
TOTAL=${1:-560}; shift || true
SHAPES=${*:-6 0 5}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.:tests${PYTHONPATH:+:$PYTHONPATH}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)
TAG=${VARIANT_TAG:-${GPU}var}
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv > "$OUT/gpu.txt"
# VARIANT_SET picks the variants timed against the default (each set's reason beside it):
case "${VARIANT_SET:-designs}" in
  designs)   # the designs of stops 37-39, before the H100 timing of 2026-12-06
    VARIANTS=(
      --variant 'previous={"split_combine_in_kernel": false, "strong_gates_apart": false, "split_grads_bwd": false}'
      --variant 'apart={"strong_gates_apart": true}'
      --variant 'sgrads={"split_grads_bwd": true}'
      --variant 'cum={"cumulative_gates": true}'
    ) ;;
  near)   # the knobs left for the two near misses of the H100 table (bench_kernels_h100d:
    # forward 1.98x the peer at 2 x 8192, forward+backward 1.95x at 4 x 4096; shapes 2 1): the
    # split's program target, both passes' strong tiles apart, 8 warps for the state walks, the
    # key loop of block_k_bwd=None
    VARIANTS=(
      --variant 'split128={"split_programs": 128}'
      --variant 'split384={"split_programs": 384}'
      --variant 'apart={"strong_gates_apart": true}'
      --variant 'auto_states={"warps_states": null, "block_k_bwd": null}'
    ) ;;
  warps)   # the gradient kernels' registers (read on a CPU, kernel_registers at 8 x 2048,
    # M = 64: pass 2's spills 1304 bytes per thread with its strong paths inline, 244 with them
    # apart; 16 warps cap the kernels at 128 registers)
    VARIANTS=(
      --variant 'apart={"strong_gates_apart": true}'
      --variant 'p16={"warps_par": 16}'
      --variant 'p16apart={"warps_par": 16, "strong_gates_apart": true}'
    ) ;;
  chunks)   # several chunks per program of the output and gradient kernels (one program per
    # SM at 255 registers, no loop: loads and work never overlap; a loop lets Triton pipeline
    # the next chunk's loads), 2 and 4 on both, 2 on the gradient kernel only
    VARIANTS=(
      --variant 'c2={"chunks_per_program_fwd": 2, "chunks_per_program_bwd": 2}'
      --variant 'c4={"chunks_per_program_fwd": 4, "chunks_per_program_bwd": 4}'
      --variant 'c2bwd={"chunks_per_program_bwd": 2}'
    ) ;;
  identity)   # the key-gated pass's gate gradient from the finished dq, dk (read on a CPU,
    # kernel_registers_cpuident: pass 2's gradient kernel at M = 64 spills 612 bytes per
    # thread instead of 1304, 64 instead of 244 with strong tiles apart), alone and with apart
    VARIANTS=(
      --variant 'ident={"key_gate_grad_identity": true}'
      --variant 'ident_apart={"key_gate_grad_identity": true, "strong_gates_apart": true}'
      --variant 'apart={"strong_gates_apart": true}'
    ) ;;
  *) echo "VARIANT_SET=$VARIANT_SET: not designs, near, warps, chunks or identity" >&2; exit 2 ;;
esac
for s in $SHAPES; do
  left=$(( TOTAL - 30 - SECONDS )); [ $left -lt 60 ] && { echo "no time for shape $s"; break; }
  merge=(); [ -f "$OUT/bench_kernels_${TAG}.json" ] && merge=(--merge)
  timeout $(( left < 200 ? left : 200 )) python3 experiments/bench_kernels.py --tag "$TAG" \
    --only "$s" --impls pallas --no-decode --no-check "${VARIANTS[@]}" "${merge[@]}" \
    --out "$OUT" 2>&1 | tee -a "$OUT/bench.log" | grep -v "^WARNING" | grep "^|" | tail -20
done
left=$(( TOTAL - SECONDS ))
if [ $left -gt 30 ]; then
  K="cumulative or in_kernel or split_gradient or strong_gates_apart or chunks_per_program"
  timeout $left python3 -m pytest -q -x tests/test_pallas_kernels.py \
    -k "$K or key_gate_grad_identity" 2>&1 \
    | tee "$OUT/pytest.log" | tail -5
fi

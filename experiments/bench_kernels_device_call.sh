#!/bin/bash
# One device call of bench_kernels.py with the peer (flash-linear-attention 0.6.0, its wheels
# carried in .whl/: see ../shared/README), resumable over chained calls on a held machine.
#
#   bash experiments/bench_kernels_device_call.sh SECONDS TAG [bench_kernels.py options...]
#     e.g. (device tool, carry [".whl"])
#          bash experiments/bench_kernels_device_call.sh 560 h200d --only 1 2 0 6 --impls pallas peer attn
#
# The report accumulates in devstate/bench (not copied, not carried: it survives between calls
# while the machine is held; --merge is added when this tag's report is there) and is copied to
# $OUT after each call. The peer's Triton autotuning results are kept in devstate/ptc and seed
# the next call's peer (its autotune otherwise restarts in every process: minutes per shape);
# they also come back in $OUT/peer_tune_cache_TAG.tgz; a fresh machine starts from
# experiments/peer_tune_cache/<h100|h200> (unpack that tgz there to keep them).
set -u -o pipefail
TOTAL=$1; TAG=$2; shift 2
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" devstate/ptc devstate/bench
pip install -q --no-index --no-deps --target /tmp/site .whl/fla_core-*.whl \
  .whl/flash_linear_attention-*.whl > "$OUT/pip.log" 2>&1 || echo "fla wheels not installed"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:.:tests
nvidia-smi --query-gpu=name,clocks.max.sm,driver_version --format=csv > "$OUT/gpu.txt"
GPU=$(grep -q H200 "$OUT/gpu.txt" && echo h200 || echo h100)
# a fresh machine starts from the committed results of its kind of GPU, if any
[ -z "$(ls devstate/ptc)" ] && [ -d "experiments/peer_tune_cache/$GPU" ] \
  && cp -r "experiments/peer_tune_cache/$GPU"/. devstate/ptc/
merge=(); [ -f "devstate/bench/bench_kernels_$TAG.json" ] && merge=(--merge)
timeout $(( TOTAL - 15 - SECONDS )) python3 experiments/bench_kernels.py --tag "$TAG" \
  --peer-tune-cache devstate/ptc --out devstate/bench "${merge[@]}" "$@" 2>&1 \
  | grep -v "^WARNING" > "$OUT/bench_${TAG}_$(date +%H%M%S).log"
echo "bench exit ${PIPESTATUS[0]}"
[ -f "devstate/bench/peer_tune_cache_$TAG.tgz" ] && tar xzf "devstate/bench/peer_tune_cache_$TAG.tgz" -C devstate/ptc
cp devstate/bench/* "$OUT"/ 2>/dev/null
tail -n 70 "$OUT"/bench_"${TAG}"_*.log | cut -c1-220

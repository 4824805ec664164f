#!/bin/bash
# One device call of an MQAR cell (authors' setup) that spans several calls on a held machine.
#
#   bash experiments/mqar_device_call.sh MODEL WIDTH [SECONDS] [TAG]
#     e.g. (device tool, no carry)  bash experiments/mqar_device_call.sh gsa 128 585
#
# The cell's state and report live in devstate/ (ignored by git): a path that is not part of
# the copied tree and is not carried survives between calls while the machine is held (its
# idle release is ~30 s: chain the calls), and is lost with the machine. At D >= 128 a
# 4-run cell's state (~72 MiB at D = 128, ~12 bytes per parameter per run) is more than a
# call may return (64 MiB, 8 files), so it is returned only when it fits (as 15 MiB parts,
# a backup); otherwise finish the cell within one session's device time, or move its state
# out and back in pieces with experiments/mqar_state_transfer.sh (experiments/README, MQAR).
# XLA's executables are kept in devstate/jaxcache too: a chained call of the same cell (or a
# later cell of the same model and width) skips the ~30 s compile on a held machine.
# MQAR_CELL_DIR (default devstate): where this call keeps its logs/, o/ (the report) and
# jaxcache/; the states stay in devstate/mqstate (experiments/mqar_device_cells.sh runs several
# cells side by side, each with its own MQAR_CELL_DIR).
# GSA_PALLAS_TUNING (kernel launch parameters, e.g. the best of mqar_step_profile.py's tunings
# for the cell's small heads) passes through; each cell records the tuning it trained with.
# MQAR_EXTRA: more mqar_authors.py options (they override the ones above; e.g. a CPU trial).
# $OUT gets: the report (json, md), logs.tgz (the run's log, nvidia-smi samples, the state
# dir listing before and after), and st.part* when they fit.
set -u
M=$1; W=$2; TOTAL=${3:-585}; TAG=${4:-h200e$W}
export PYTHONPATH=.
T0=$(date +%s)
OUT=$(mkdir -p "${OUT:-/tmp/out}" && cd "${OUT:-/tmp/out}" && pwd)   # absolute: used from devstate/
CELL_DIR=${MQAR_CELL_DIR:-devstate}
# MQAR_STATE_DIR (default devstate/mqstate, must lie in devstate/): where the cell's state is
# kept; mqar_device_cells.sh gives each lr part of a cell its own, so that two parts of one
# cell queued on one machine do not share a state.
STATE=${MQAR_STATE_DIR:-devstate/mqstate}
case "$STATE" in devstate/*) ;; *) echo "MQAR_STATE_DIR must lie in devstate/: $STATE" >&2; exit 2 ;; esac
LOGS=$CELL_DIR/logs; REPORT=$CELL_DIR/o
mkdir -p "$STATE" "$REPORT" "$LOGS"
rm -f "$LOGS"/*
{ date; ls -la "$STATE" "$REPORT"; } > "$LOGS/state_before.txt" 2>&1
nvidia-smi ${CUDA_VISIBLE_DEVICES:+-i "$CUDA_VISIBLE_DEVICES"} \
  --query-gpu=timestamp,index,clocks.sm,power.draw,temperature.gpu,utilization.gpu \
  --format=csv -l 10 > "$LOGS/smi.csv" 2>&1 &
SMI=$!
touch "$LOGS/marker"; sleep 1
LEFT=$(( TOTAL - ($(date +%s) - T0) - 30 ))
# --call-seconds: the process's wall clock (compiles included); --pause-seconds: training
timeout "$LEFT" python experiments/mqar_authors.py --tag "$TAG" --out-dir "$REPORT" \
  --models "$M" --widths "$W" --lr 2e-3 5e-3 --seeds 2 --max-epochs 64 --dtype bfloat16 \
  --state-dir "$STATE" --pause-seconds $((LEFT - 70)) --call-seconds $((LEFT - 20)) --merge \
  --compile-cache "$CELL_DIR/jaxcache" \
  ${MQAR_EXTRA:-} > "$LOGS/mqar_${M}_D${W}.txt" 2>&1
echo "exit $?" >> "$LOGS/mqar_${M}_D${W}.txt"
kill "$SMI" 2>/dev/null
cp "$REPORT"/mqar_authors_"$TAG".json "$REPORT"/mqar_authors_"$TAG".md "$OUT"/ 2>/dev/null
{ date; ls -la "$STATE" "$REPORT"; } > "$LOGS/state_after.txt" 2>&1
# this cell's state parts written in this call
MARKER=$(cd "$LOGS" && pwd)/marker
NEW=$(cd devstate && find "${STATE#devstate/}" -newer "$MARKER" -type f -name "${M}_D${W}.state.*")
BYTES=$(cd devstate && du -cb $NEW 2>/dev/null | tail -1 | cut -f1)
if [ -n "$NEW" ] && [ "${BYTES:-0}" -lt $((58 * 1024 * 1024)) ]; then
  (cd devstate && tar cf - $NEW | split -b 15M - "$OUT/st.part")
elif [ -n "$NEW" ]; then
  echo "state not returned: ${BYTES} bytes (kept in $STATE)" >> "$LOGS/state_after.txt"
fi
tar czf "$OUT/logs.tgz" -C "$CELL_DIR" logs

#!/bin/bash
# Several MQAR cells (authors' setup) in one device call, side by side on a machine of several
# GPUs: each cell is one mqar_device_call.sh process on one GPU (CUDA_VISIBLE_DEVICES), with its
# own logs, report and compile cache in devstate/cells/<model>_D<width>/ and its state in
# devstate/mqstate like a single cell's, so chained calls resume every paused cell.
#
#   bash experiments/mqar_device_cells.sh SECONDS TAG CELL [CELL ...]
#     CELL = MODEL:WIDTH, or MODEL:WIDTH:LR[,LR...] for one lr part of a cell ("Cells in parts",
#     experiments/README: its lrs replace the call's, and the part keeps its own logs, report
#     and state in devstate/cells/<model>_D<width>_lr<lrs>/ and devstate/mqstate/lr<lrs>/), or
#     MODEL:WIDTH:LR[,LR...]:sSEED for one seed of those lrs (--seeds 1 --first-seed SEED; dirs
#     ..._lr<lrs>_s<SEED>/), for a cell whose 2-seed parts do not finish in one session
#     e.g. (device tool, a kind of 4 GPUs, no carry)
#     bash experiments/mqar_device_cells.sh 585 h100e128 gla:128 retnet:128 attention:128
#     or on one GPU, parts one after another (each call resumes the paused one and passes the
#     finished ones in seconds):
#     bash experiments/mqar_device_cells.sh 585 h100e256 gsa:256:5e-3 attention:256:4.64e-4
#
# Cells go to the GPUs in turn (MQAR_GPUS overrides the count nvidia-smi gives); a GPU with
# more than one cell trains them one after another, each with the call's time left, and a cell
# that would start with under 120 s left waits for the next call. $OUT gets the report of every
# cell trained under TAG so far (this call's cells and earlier calls', single-cell calls' in
# devstate/o included) as mqar_authors_TAG.{json,md,png}, and cells.tgz (each cell's logs, the
# merge's log, and the cells left for the next call). The states of the cells and parts that
# paused come back as st.part* (15 MiB pieces of one tar, paths under devstate/) when they fit
# beside those four files (45 MiB together: a 2-run lr part up to D = 128), so a session that
# ends while a part is paused keeps it: carry the pieces in a folder F of the checkout and
# start the next session's call with `cat F/st.part* | tar xf - -C devstate` (experiments/
# README, MQAR). Larger states stay on the machine (left.txt says so): move one with
# experiments/mqar_state_transfer.sh.
# MQAR_EXTRA and GSA_PALLAS_TUNING pass through to every cell.
set -u
TOTAL=$1; TAG=$2; shift 2
T0=$(date +%s)
OUT=${OUT:-/tmp/out}
export PYTHONPATH=.
mkdir -p "$OUT" devstate/cells
rm -f devstate/cells/left.txt devstate/cells/merge.txt
GPUS=${MQAR_GPUS:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')}
[ "${GPUS:-0}" -ge 1 ] || GPUS=1

parse_cell() {   # CELL: sets m, w, lrs, seed, and the cell's (or part's) dir and state dir
  local part
  IFS=: read -r m w lrs seed <<< "$1"
  seed=${seed#s}
  part=${lrs:+lr${lrs//,/_}}${seed:+_s$seed}   # a part's own name, empty for a whole cell
  dir=devstate/cells/${m}_D${w}${part:+_$part}; state=devstate/mqstate${part:+/$part}
}

train_on_gpu() {   # GPU CELL...: the cells one after another
  local gpu=$1 cell m w lrs seed dir state extra left
  shift
  for cell in "$@"; do
    parse_cell "$cell"
    extra=${MQAR_EXTRA:-}${lrs:+ --lr ${lrs//,/ }}${seed:+ --seeds 1 --first-seed $seed}
    left=$(( TOTAL - ($(date +%s) - T0) - 40 ))
    if [ "$left" -lt 120 ]; then
      echo "$cell (GPU $gpu): not started, $left s left" >> devstate/cells/left.txt
      continue
    fi
    CUDA_VISIBLE_DEVICES=$gpu MQAR_CELL_DIR="$dir" MQAR_STATE_DIR="$state" MQAR_EXTRA="$extra" \
      OUT="$dir/out" bash experiments/mqar_device_call.sh "$m" "$w" "$left" "$TAG"
  done
}

declare -a QUEUE
i=0
for cell in "$@"; do
  if ! [[ "$cell" =~ ^[a-z]+:[0-9]+(:[0-9.eE+-]+(,[0-9.eE+-]+)*(:s[0-9]+)?)?$ ]]; then
    echo "cell '$cell' is not MODEL:WIDTH, MODEL:WIDTH:LR[,LR...] or MODEL:WIDTH:LR[,LR...]:sSEED" >&2
    exit 2
  fi
  QUEUE[$((i % GPUS))]="${QUEUE[$((i % GPUS))]:-} $cell"
  i=$((i + 1))
done
for g in "${!QUEUE[@]}"; do
  # shellcheck disable=SC2086  # the queue is a list of words
  train_on_gpu "$g" ${QUEUE[$g]} &
done
wait

# oldest first: where two reports hold one cell, the later one wins
REPORTS=$(ls -tr devstate/cells/*/o/mqar_authors_"$TAG".json devstate/o/mqar_authors_"$TAG".json \
  2>/dev/null)
if [ -n "$REPORTS" ]; then
  # shellcheck disable=SC2086
  python experiments/mqar_authors.py --tag "$TAG" --merge-only --merge-files $REPORTS \
    --out-dir "$OUT" > devstate/cells/merge.txt 2>&1
fi
# the paused cells' and parts' state files (paths under devstate/), from their own reports
PAUSED=()
for cell in "$@"; do
  parse_cell "$cell"
  report=$dir/o/mqar_authors_$TAG.json
  [ -f "$report" ] || continue
  if python -c 'import json, sys
cells = json.load(open(sys.argv[1]))["cells"]
sys.exit(0 if any(c["model"] == sys.argv[2] and c["width"] == int(sys.argv[3])
                  and c["stop_reason"].startswith("paused") for c in cells) else 1)' \
      "$report" "$m" "$w"; then
    PAUSED+=($(cd devstate && ls "${state#devstate/}/${m}_D${w}".state.* 2>/dev/null))
  fi
done
if [ ${#PAUSED[@]} -gt 0 ]; then
  BYTES=$(cd devstate && du -cb "${PAUSED[@]}" | tail -1 | cut -f1)
  if [ "$BYTES" -le $((45 * 1024 * 1024)) ]; then
    (cd devstate && tar cf - "${PAUSED[@]}" | split -b 15M - "$OUT/st.part")
    echo "paused states returned as st.part*: ${PAUSED[*]}" >> devstate/cells/left.txt
  else
    echo "paused states not returned: $BYTES bytes (kept in devstate/mqstate)" \
      >> devstate/cells/left.txt
  fi
fi
(cd devstate/cells && tar czf "$OUT/cells.tgz" $(ls -d */logs merge.txt left.txt 2>/dev/null))

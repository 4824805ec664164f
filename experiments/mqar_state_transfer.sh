#!/bin/bash
# Moves a paused MQAR cell's state (mqar_device_call.sh keeps it in devstate/mqstate on the held
# device machine) between the device and this checkout in pieces, so that a cell whose state is
# more than one call returns or carries (64 MiB: ~72 MiB at D = 128, ~150 MiB at D = 256 for 4
# runs) can pause in one session and resume in the next.
#
#   on the device (device tool):
#     bash experiments/mqar_state_transfer.sh get MODEL WIDTH FIRST [COUNT]
#         $OUT gets MANIFEST (sha256 of every part of the cell's state) and the parts
#         FIRST .. FIRST+COUNT-1 (COUNT 3 by default: 45 MiB of 15 MiB parts)
#     bash experiments/mqar_state_transfer.sh put MODEL WIDTH      (carry tcache/mqput)
#         adds the carried parts to devstate/mqput; once every part of the carried MANIFEST is
#         there and checks, replaces the cell's state in devstate/mqstate with them (an
#         incomplete or damaged upload never touches it); exit 3 while parts are missing,
#         4 when the complete upload fails its checksums (the staged parts are dropped)
#   here:
#     bash experiments/mqar_state_transfer.sh verify DIR MODEL WIDTH
#         checks DIR (the parts and MANIFEST gathered from the get calls' outputs)
#     bash experiments/mqar_state_transfer.sh stage DIR MODEL WIDTH FIRST [COUNT]
#         fills tcache/mqput with MANIFEST and parts FIRST .. FIRST+COUNT-1 of DIR, to carry
#         with the next put call
set -u
MODE=$1; shift
cell() { echo "${1}_D${2}"; }
parts_of() { (cd "$1" && ls "$2".state.[0-9][0-9][0-9] 2>/dev/null); }
# the parts FIRST .. FIRST+COUNT-1 of the list on stdin
window() { tail -n +$(( $1 + 1 )) | head -n "$2"; }

case "$MODE" in
get)
  CELL=$(cell "$1" "$2"); FIRST=$3; COUNT=${4:-3}
  OUT=${OUT:-/tmp/out}; STATE=devstate/mqstate
  mkdir -p "$OUT"
  ALL=$(parts_of "$STATE" "$CELL")
  [ -n "$ALL" ] || { echo "no state of $CELL in $STATE" >&2; exit 2; }
  (cd "$STATE" && sha256sum $ALL) > "$OUT/MANIFEST"
  for p in $(echo "$ALL" | window "$FIRST" "$COUNT"); do cp "$STATE/$p" "$OUT/"; done
  echo "$CELL: $(echo "$ALL" | wc -l) parts, $(du -cb $(printf "$STATE/%s " $ALL) | tail -1 | cut -f1) bytes; returned: $(echo "$ALL" | window "$FIRST" "$COUNT" | tr '\n' ' ')"
  ;;
put)
  CELL=$(cell "$1" "$2"); STAGE=devstate/mqput/$CELL; STATE=devstate/mqstate
  [ -f tcache/mqput/MANIFEST ] || { echo "carry tcache/mqput (stage it here first)" >&2; exit 2; }
  mkdir -p "$STAGE" "$STATE"
  # a MANIFEST other than the staged one starts the upload afresh
  cmp -s tcache/mqput/MANIFEST "$STAGE/MANIFEST" || rm -f "$STAGE"/*
  cp tcache/mqput/MANIFEST "$STAGE/"
  for p in $(parts_of tcache/mqput "$CELL"); do cp "tcache/mqput/$p" "$STAGE/"; done
  MISSING=$(cd "$STAGE" && awk '{print $2}' MANIFEST | while read -r p; do [ -f "$p" ] || echo "$p"; done)
  if [ -n "$MISSING" ]; then echo "$CELL: waiting for $(echo "$MISSING" | tr '\n' ' ')"; exit 3; fi
  if ! (cd "$STAGE" && sha256sum --quiet -c MANIFEST); then
    rm -rf "$STAGE"   # start again from the first part
    echo "$CELL: upload damaged; staging cleared" >&2; exit 4
  fi
  rm -f "$STATE/$CELL".state.*
  (cd "$STAGE" && awk '{print $2}' MANIFEST | while read -r p; do mv "$p" "../../mqstate/$p"; done)
  rm -rf "$STAGE"
  echo "$CELL: state installed ($(parts_of "$STATE" "$CELL" | wc -l) parts)"
  ;;
verify)
  DIR=$1; CELL=$(cell "$2" "$3")
  (cd "$DIR" && [ "$(awk '{print $2}' MANIFEST | sort)" = "$(parts_of . "$CELL")" ] \
    && sha256sum --quiet -c MANIFEST) || { echo "$CELL: $DIR is incomplete or damaged" >&2; exit 4; }
  echo "$CELL: complete in $DIR"
  ;;
stage)
  DIR=$1; CELL=$(cell "$2" "$3"); FIRST=$4; COUNT=${5:-3}
  rm -rf tcache/mqput; mkdir -p tcache/mqput
  cp "$DIR/MANIFEST" tcache/mqput/
  for p in $(awk '{print $2}' "$DIR/MANIFEST" | window "$FIRST" "$COUNT"); do
    cp "$DIR/$p" tcache/mqput/
  done
  ls tcache/mqput
  ;;
*)
  echo "usage: $0 get|put|verify|stage ..." >&2; exit 2
  ;;
esac

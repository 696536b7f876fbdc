#!/usr/bin/env bash
# Send files larger than one device call's carry (64 MiB with the working tree) to a GPU machine in pieces.
#
#   bash bench/carry_pieces.sh split DIR FILE...    # here: DIR/1, DIR/2, ... each at most $PIECE_MB MiB
#   bash bench/carry_pieces.sh put DIR/N            # there, call N (carry DIR/N): keep its pieces in /tmp
#   bash bench/carry_pieces.sh join DEST            # there, after the last call: reassemble into DEST,
#                                                   # checked against the sha256 sums written by split
#
# Made for the DALI wheels (247 MB with their dependencies; bench/slim_wheels.py now shrinks them to one
# call, bench/README.md), e.g.
#   echo /.pieces/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d /tmp/dali nvidia-dali-cuda130==2.4.0 ...
#   bash bench/carry_pieces.sh split .pieces /tmp/dali/*.whl
# then one device call per piece folder, each within the 30 s the machine stays warm after the last:
#   run(command="bash bench/carry_pieces.sh put .pieces/1", carry=[".pieces/1"]), ... ,
#   run(command="bash bench/carry_pieces.sh put .pieces/K && bash bench/carry_pieces.sh join .whl && \
#       bash bench/gpu_check.sh", carry=[".pieces/K"]).
set -euo pipefail
PIECE_MB=${PIECE_MB:-50}
STORE=${PIECES_STORE:-/tmp/carried_pieces}

case "${1:-}" in
  split)
    out=$2; shift 2
    [ $# -gt 0 ] || { echo "carry_pieces split: no files given" >&2; exit 2; }
    rm -rf "$out"; mkdir -p "$out"
    work=$(mktemp -d)
    tar_args=()
    for f in "$@"; do
      [ -f "$f" ] || { echo "carry_pieces split: $f is not a file" >&2; exit 2; }
      (cd "$(dirname "$f")" && sha256sum "$(basename "$f")") >> "$work/SHA256SUMS"
      tar_args+=(-C "$(cd "$(dirname "$f")" && pwd)" "$(basename "$f")")
    done
    # one tar stream of all the files, cut into pieces of PIECE_MB MiB: one piece per folder
    tar -cf - "${tar_args[@]}" | split -b "${PIECE_MB}M" -d -a 3 - "$work/bundle.part."
    n=0
    for part in "$work"/bundle.part.*; do
      n=$((n + 1)); mkdir -p "$out/$n"; mv "$part" "$out/$n/"
    done
    mv "$work/SHA256SUMS" "$out/$n/"
    rmdir "$work"
    echo "carry_pieces: $# file(s) in $n folder(s) under $out (at most ${PIECE_MB} MiB each): one device call per folder"
    ;;
  put)
    mkdir -p "$STORE"
    cp "$2"/* "$STORE"/
    echo "carry_pieces: $(ls "$STORE" | wc -l) piece(s) held in $STORE"
    ;;
  join)
    dest=$2; mkdir -p "$dest"
    [ -f "$STORE/SHA256SUMS" ] || { echo "carry_pieces join: SHA256SUMS not there yet (the last folder's call)" >&2; exit 2; }
    cat "$STORE"/bundle.part.* | tar -xf - -C "$dest" \
      || { echo "carry_pieces join: the pieces do not make a whole archive (one missing?)" >&2; exit 1; }
    (cd "$dest" && sha256sum -c --quiet "$STORE/SHA256SUMS") || { echo "carry_pieces join: checksum mismatch" >&2; exit 1; }
    echo "carry_pieces: joined $(wc -l < "$STORE/SHA256SUMS") file(s) into $dest"
    ;;
  *)
    awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 2  # the comment block above
    ;;
esac

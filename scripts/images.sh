#!/usr/bin/env bash
# Builds the Trellis images (trellis/{registry,sidecar,demo-app,demo-client,mesh-intruder}:$TRELLIS_TAG)
# without pulling anything: the release binaries, stripped of debug info, in FROM scratch images,
# with Docker's legacy builder.
#
#   scripts/images.sh                       # from target/x86_64-unknown-linux-gnu/release (build them first)
#   TRELLIS_BIN_DIR=DIR scripts/images.sh   # from binaries elsewhere
#   TRELLIS_TAG=test scripts/images.sh      # another tag (default: dev)
#   TRELLIS_FROM_SOURCE=1 scripts/images.sh # compile inside Docker instead (needs internet and BuildKit)
set -euo pipefail
cd "$(dirname "$0")/.."

BINS=(registry sidecar demo-app demo-client mesh-intruder)
TAG=${TRELLIS_TAG:-dev}
BIN_DIR=${TRELLIS_BIN_DIR:-target/x86_64-unknown-linux-gnu/release}

if [ "${TRELLIS_FROM_SOURCE:-0}" = 1 ]; then
  for b in "${BINS[@]}"; do
    DOCKER_BUILDKIT=1 docker build --target "$b-from-source" -t "trellis/$b:$TAG" .
  done
  exit 0
fi

mkdir -p target/docker
for b in "${BINS[@]}"; do
  if [ ! -x "$BIN_DIR/$b" ]; then
    echo "images.sh: $BIN_DIR/$b is missing: run 'cargo build --release --workspace --bins' first" >&2
    exit 1
  fi
  # Debug info (kept in the release profile for backtraces) triples the size; symbols stay.
  strip --strip-debug -o "target/docker/$b.tmp" "$BIN_DIR/$b"
  mv "target/docker/$b.tmp" "target/docker/$b"
done
for b in "${BINS[@]}"; do
  # Quiet unless it fails (the legacy builder also prints a deprecation notice every time).
  if ! out=$(DOCKER_BUILDKIT=0 docker build --target "$b" -t "trellis/$b:$TAG" . 2>&1); then
    echo "$out" >&2
    echo "images.sh: building trellis/$b:$TAG failed" >&2
    exit 1
  fi
  size=$(docker image inspect -f '{{.Size}}' "trellis/$b:$TAG")
  echo "images.sh: trellis/$b:$TAG $((size / 1024 / 1024)) MB"
done

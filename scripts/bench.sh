#!/usr/bin/env bash
# The one command behind BENCHMARKS.md: installs the peers (HAProxy, nginx,
# etcd, h2load, tcpdump) from Debian when missing, builds Trellis in the
# `bench-release` profile (LTO, one codegen unit), runs every case on loopback
# and writes BENCHMARKS.md with its charts under bench/charts/.
#
#   scripts/bench.sh           full run (about 10 minutes on 2 cores)
#   scripts/bench.sh --quick   every case briefly with small sizes (CI; no thresholds)
#
# Other arguments go to `trellis-bench run` (see `trellis-bench run --help`),
# for example `--cases 1,2`. Set BENCH_PROFILE=release to skip LTO.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
for a in "$@"; do
  [ "$a" = "--quick" ] && quick=1
done

scripts/install-bench-deps.sh

profile="${BENCH_PROFILE:-bench-release}"
if [ "$quick" = 1 ] && [ -z "${BENCH_PROFILE:-}" ]; then
  # CI: the ordinary release profile builds much faster; the figures of a
  # quick run are not kept anyway.
  profile=release
fi
cargo build --profile "$profile" -p trellis-bench -p trellis-registry -p trellis-sidecar --bins
target_dir="$(cargo metadata --format-version 1 --no-deps 2>/dev/null | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
bin_dir="${target_dir:-target}/x86_64-unknown-linux-gnu/$profile"

out=BENCHMARKS.md
charts=bench/charts
if [ "$quick" = 1 ]; then
  # A quick run must not overwrite the committed figures.
  out="${BENCH_OUT:-${TMPDIR:-/tmp}/trellis-bench-quick/BENCHMARKS.md}"
  charts="$(dirname "$out")/charts"
  mkdir -p "$(dirname "$out")"
fi

cmd="scripts/bench.sh${*:+ $*}"
exec "$bin_dir/trellis-bench" run --bin-dir "$bin_dir" --out "$out" --charts "$charts" \
  --profile "$profile" --command "$cmd" "$@"

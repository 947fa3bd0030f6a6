#!/usr/bin/env bash
# The test command. Builds every binary in release for the configured target
# (static: .cargo/config.toml), then runs every test in release, so the tests find
# the binaries beside their own executable (tests/src/lib.rs::bin_dir) and the
# failure tests across containers package those same binaries into their images.
#
# The compose failure tests (tests/tests/compose_failures.rs) run last, one at a
# time, with their output shown: they print what they measured. Without a Docker
# engine they print SKIPPED and pass, unless CI=true.
#
# Extra arguments go to the test harness of the first run, e.g.
#   scripts/test.sh registry_    # only tests whose name contains registry_
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --workspace --bins
cargo test --release --workspace -- --skip compose_ "$@"
if [ "$#" -eq 0 ]; then
  cargo test --release -p trellis-tests --test compose_failures -- --nocapture --test-threads=1
  # The ha compose file (docker-compose.ha.yml): etcd members, two registry replicas.
  cargo test --release -p trellis-tests --test etcd_compose -- --nocapture --test-threads=1
fi

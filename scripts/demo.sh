#!/usr/bin/env bash
# The demo in one command, from a fresh clone: builds the static release
# binaries, packs them into FROM scratch images (nothing is pulled), starts
# docker-compose.yml, and follows the client's per-second counts.
#
#   scripts/demo.sh          build, start, follow the client (Ctrl-C stops following; the demo keeps running)
#   scripts/demo.sh down     stop and remove the demo (the fourth replica too)
#
# Without a Rust toolchain but with internet and BuildKit, compile inside Docker:
#   TRELLIS_FROM_SOURCE=1 scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

compose() {
  if command -v docker-compose >/dev/null 2>&1; then
    docker-compose "$@"
  else
    docker compose "$@"
  fi
}

case "${1:-up}" in
  up) ;;
  down)
    compose --profile scale down -v --remove-orphans
    exit 0
    ;;
  *)
    echo "usage: scripts/demo.sh [up|down]" >&2
    exit 2
    ;;
esac

if [ "${TRELLIS_FROM_SOURCE:-0}" != 1 ]; then
  cargo build --release --workspace --bins
fi
scripts/images.sh
compose up -d
cat <<'TXT'

Trellis demo running: registry, app1..app3 each with a sidecar, a client calling `demo` through its sidecar.
  registry:              curl -s http://127.0.0.1:7600/v1/services/demo
  client's counts:       docker-compose logs -f client
  try a failure:         docker kill $(docker-compose ps -q app2)       (more in docs/compose.md)
  a fourth replica:      docker-compose --profile scale up -d app4 sidecar4
  stop it all:           scripts/demo.sh down
TXT
if [ -t 1 ]; then
  echo
  compose logs -f --tail=5 client
fi

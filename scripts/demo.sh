#!/usr/bin/env bash
# The demo in one command, from a fresh clone: builds the static release
# binaries, packs them into FROM scratch images (nothing is pulled), starts
# docker-compose.yml, and follows the client's per-second counts.
#
# Tokens and TLS are on. The first run writes the credentials with the
# registry's own `registry init` into .trellis/ (git-ignored; TRELLIS_SECRETS
# names another folder): a CA, the registry's certificate, acl.toml and a token
# each for the replicas (demo), the client (client), admin and observer. Later
# runs keep them; delete the folder for new ones.
#
#   scripts/demo.sh          build, start, follow the client (Ctrl-C stops following; the demo keeps running)
#   scripts/demo.sh down     stop and remove the demo (the fourth replica and Prometheus too)
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
    compose --profile scale --profile metrics down -v --remove-orphans
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

secrets=${TRELLIS_SECRETS:-.trellis}
export TRELLIS_SECRETS=$secrets
if [ "$(id -u)" = 0 ]; then
  # Root hands the files to the images' user; the containers run as it.
  owner=(--owner 65532:65532)
else
  # The containers run as the caller, who owns the 0600 files. Later
  # docker-compose commands (README, docs/compose.md) read the same user from .env.
  owner=()
  export TRELLIS_UID=$(id -u) TRELLIS_GID=$(id -g)
  if ! grep -qs '^TRELLIS_UID=' .env; then
    printf 'TRELLIS_UID=%s\nTRELLIS_GID=%s\n' "$TRELLIS_UID" "$TRELLIS_GID" >>.env
  fi
fi
if [ ! -f "$secrets/ca.pem" ]; then
  init_args=(--service demo --service client --name registry --name localhost --name 127.0.0.1 ${owner[@]+"${owner[@]}"})
  bin=target/x86_64-unknown-linux-gnu/release/registry
  if [ -x "$bin" ] && [ "${TRELLIS_FROM_SOURCE:-0}" != 1 ]; then
    "$bin" init "$secrets" "${init_args[@]}"
  else
    # No host binary: the registry image writes them (as the caller, or as root handing them over).
    mkdir -p "$secrets"
    docker run --rm --user "$(id -u):$(id -g)" -v "$(cd "$secrets" && pwd):/out" \
      "trellis/registry:${TRELLIS_TAG:-dev}" init /out "${init_args[@]}"
  fi
fi
# The metrics profile's Prometheus reads its token from this copy of its configuration.
scripts/prometheus-config.sh "$secrets" >/dev/null
compose up -d
cat <<'TXT'

Trellis demo running: registry, app1..app3 each with a sidecar, a client calling `demo` through its sidecar.
Tokens and TLS are on; the credentials are in .trellis/ (never committed).
  registry:              curl --cacert .trellis/ca.pem -H "Authorization: Bearer $(cat .trellis/tokens/observer.token)" https://127.0.0.1:7600/v1/services/demo
  without a token:       curl --cacert .trellis/ca.pem https://127.0.0.1:7600/v1/services/demo       (401)
  client's counts:       docker-compose logs -f client
  try a failure:         docker kill $(docker-compose ps -q app2)       (more in docs/compose.md)
  a fourth replica:      docker-compose --profile scale up -d app4 sidecar4
  stop it all:           scripts/demo.sh down
TXT
if [ -t 1 ]; then
  echo
  compose logs -f --tail=5 client
fi

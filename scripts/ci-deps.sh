#!/usr/bin/env bash
# Installs what CI needs and a fresh machine may lack, from Debian's packages
# (as root, which CI is); idempotent: installs nothing when all is present.
# Needed: rustfmt and clippy (rustup components), strip (binutils, for the
# images), the docker CLI and docker-compose (the compose failure tests; the
# engine itself is the machine's), wrk and python3 (the overlapping-failure
# tests load Python backends through a sidecar with wrk), chromium (the dashboard's
# browser test drives it headless).
set -euo pipefail

if command -v rustup >/dev/null 2>&1; then
  cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
  cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
fi

missing=()
command -v strip >/dev/null 2>&1 || missing+=(binutils)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
command -v chromium >/dev/null 2>&1 || missing+=(chromium fonts-dejavu-core)
command -v docker >/dev/null 2>&1 || missing+=(docker.io)
if ! command -v docker-compose >/dev/null 2>&1 && ! docker compose version >/dev/null 2>&1; then
  missing+=(docker-compose)
fi

if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "ci-deps: missing ${missing[*]}; run as root to install them" >&2
    exit 1
  fi
  echo "ci-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The machine starts the Docker engine before a session, but a daemon that died
# (or was ended with a session's processes) is started again here, as root.
if ! timeout 10 docker info >/dev/null 2>&1 && command -v dockerd >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "ci-deps: the Docker engine does not answer; starting dockerd"
  setsid nohup dockerd >>/var/log/dockerd-ci.log 2>&1 </dev/null &
  for _ in $(seq 1 60); do
    timeout 5 docker info >/dev/null 2>&1 && break
    sleep 1
  done
  timeout 10 docker info >/dev/null 2>&1 && echo "ci-deps: dockerd is up" || echo "ci-deps: dockerd did not come up (see /var/log/dockerd-ci.log)"
fi
# etcd (Debian's etcd-server) for the etcd store's tests and the ha image.
bash "$(dirname "$0")/install-etcd.sh"
# Consul clients nobody here wrote, for tests/tests/consul_clients.rs and the
# demo's metrics profile: Debian bullseye's prometheus (the last with Consul SD)
# in /opt/trellis/prometheus and py-consul from PyPI.
bash "$(dirname "$0")/install-consul-clients.sh"
echo "ci-deps: ok"

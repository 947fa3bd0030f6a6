#!/usr/bin/env bash
# Installs etcd (Debian's etcd-server, 3.4) when it is missing, for the etcd
# store's tests (tests/tests/etcd_*.rs) and the ha compose image. Idempotent.
# The package's own service is kept from starting (policy-rc.d) and stopped if
# it runs anyway: the tests start their own members on free loopback ports, and
# nothing should hold etcd's default ports 2379/2380.
set -euo pipefail

if ! command -v etcd >/dev/null 2>&1 && [ ! -x /usr/bin/etcd ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install-etcd: etcd is missing; run as root to install etcd-server" >&2
    exit 1
  fi
  echo "install-etcd: installing etcd-server"
  export DEBIAN_FRONTEND=noninteractive
  policy=/usr/sbin/policy-rc.d
  created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    created_policy=1
  fi
  trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
fi

if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
  systemctl stop etcd || true
  systemctl disable etcd >/dev/null 2>&1 || true
fi
if command -v service >/dev/null 2>&1; then
  service etcd stop >/dev/null 2>&1 || true
fi

echo "install-etcd: ok ($(etcd --version 2>/dev/null | head -1))"

#!/usr/bin/env bash
# Installs the benchmark peers from Debian's packages when they are missing:
# HAProxy, nginx, wrk, etcd (server and etcdctl), h2load (nghttp2-client),
# tcpdump (the failover case watches the dead backend's port with it) and perf.
# Idempotent: installs nothing when every tool is present. Debian's packaged
# services are stopped and disabled so nothing is left listening on the
# default ports; the harness starts each peer itself, on its own ports.
set -euo pipefail

declare -A tool_pkg=(
  [haproxy]=haproxy
  [nginx]=nginx
  [wrk]=wrk
  [etcd]=etcd-server
  [etcdctl]=etcd-client
  [h2load]=nghttp2-client
  [tcpdump]=tcpdump
  [taskset]=util-linux
)

missing=()
for tool in "${!tool_pkg[@]}"; do
  if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ] && [ ! -x "/usr/bin/$tool" ]; then
    missing+=("${tool_pkg[$tool]}")
  fi
done

if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install-bench-deps: missing ${missing[*]}; run as root to install them" >&2
    exit 1
  fi
  echo "install-bench-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # policy-rc.d 101 keeps the packages' post-install scripts from starting
  # their services at all (no daemon ever binds 80, 2379 or 2380).
  policy=/usr/sbin/policy-rc.d
  created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    created_policy=1
  fi
  trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Whatever started anyway (a machine where the packages were installed by
# hand before): stop it, so the default ports stay free.
for svc in haproxy nginx etcd; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
    systemctl stop "$svc" || true
    systemctl disable "$svc" >/dev/null 2>&1 || true
  fi
  if command -v service >/dev/null 2>&1; then
    service "$svc" stop >/dev/null 2>&1 || true
  fi
done

echo "install-bench-deps: ok"

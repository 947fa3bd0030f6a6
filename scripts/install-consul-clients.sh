#!/usr/bin/env bash
# Installs the Consul clients the Consul-compatible API is tested with, when
# missing: Debian's prometheus (its consul_sd_configs; also packaged into the
# demo's metrics image by scripts/prometheus-image.sh) and py-consul from PyPI.
# Idempotent. The package's own service is kept from starting (policy-rc.d)
# and stopped if it runs anyway: the tests start their own Prometheus, and
# nothing should hold port 9090.
set -euo pipefail

PY_CONSUL_VERSION=1.8.0

if ! command -v prometheus >/dev/null 2>&1 && [ ! -x /usr/bin/prometheus ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install-consul-clients: prometheus is missing; run as root to install it" >&2
    exit 1
  fi
  echo "install-consul-clients: installing prometheus"
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
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl stop prometheus || true
  systemctl disable prometheus >/dev/null 2>&1 || true
fi
if command -v service >/dev/null 2>&1; then
  service prometheus stop >/dev/null 2>&1 || true
fi

if ! python3 -c 'import consul' >/dev/null 2>&1; then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ]; then
      echo "install-consul-clients: pip is missing; run as root to install python3-pip" >&2
      exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  fi
  echo "install-consul-clients: installing py-consul $PY_CONSUL_VERSION"
  # Debian's own python refuses system-wide pip installs unless told.
  python3 -m pip install -q --root-user-action=ignore "py-consul==$PY_CONSUL_VERSION" 2>/dev/null \
    || python3 -m pip install -q --break-system-packages "py-consul==$PY_CONSUL_VERSION"
fi

echo "install-consul-clients: ok ($(prometheus --version 2>&1 | head -1); py-consul $(python3 -c 'import consul; print(consul.__version__)'))"

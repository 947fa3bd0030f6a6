#!/usr/bin/env bash
# Installs the Consul clients the Consul-compatible API is tested with, when
# missing: a Prometheus built with Consul service discovery, at
# /opt/trellis/prometheus (also packaged into the demo's metrics image by
# scripts/prometheus-image.sh), and py-consul from PyPI. Idempotent.
#
# Which Prometheus: Debian disabled Consul SD in 2.33.5+ds1-4 ("Disable Consul
# SD until its Debian package is back in shape"); bookworm's 2.42, trixie's
# 2.53 and sid's 3.5 all refuse `consul_sd_configs`. Bullseye's 2.24.1 is the
# last Debian build with it. Its .deb is fetched from Debian's mirror by a
# pinned SHA-256 and unpacked here, never installed through dpkg or apt's
# sources: the system's apt configuration is left as it was. The Go binary
# needs only libc, so it runs on bookworm. Its web UI's files (web/, which
# Debian's build reads from /usr/share/prometheus/web) are the deb's plus the
# libjs-* packages it links to, copied with the links resolved so the tree
# stands on its own.
set -euo pipefail

PY_CONSUL_VERSION=1.8.0
PROMETHEUS_DIR=/opt/trellis/prometheus
PROMETHEUS_DEB=prometheus_2.24.1+ds-1+b7_amd64.deb
PROMETHEUS_DEB_SHA256=7f98887c0fa36e0dd81bb39abc57a9e2535c2a0dc20442a431255ebc0b87b73a
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# The packages the deb's web/static links point into (its Depends).
PROMETHEUS_WEB_DEPS="fonts-glyphicons-halflings libjs-bootstrap4 libjs-d3 libjs-eonasdan-bootstrap-datetimepicker
  libjs-jquery libjs-jquery-hotkeys libjs-moment libjs-moment-timezone libjs-mustache libjs-popper.js libjs-rickshaw"

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "install-consul-clients: $1 is missing; run as root to install it" >&2
    exit 1
  fi
}

# The marker names the deb it came from: a changed pin reinstalls.
if [ "$(cat "$PROMETHEUS_DIR/.deb" 2>/dev/null)" != "$PROMETHEUS_DEB" ] || [ ! -x "$PROMETHEUS_DIR/prometheus" ]; then
  need_root "$PROMETHEUS_DIR/prometheus"
  echo "install-consul-clients: installing $PROMETHEUS_DEB into $PROMETHEUS_DIR"
  export DEBIAN_FRONTEND=noninteractive
  missing=""
  for pkg in $PROMETHEUS_WEB_DEPS; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $pkg"
  done
  if [ -n "$missing" ]; then
    apt-get update -qq
    # shellcheck disable=SC2086 # one word per package
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  curl -fsSL --retry 3 -o "$work/$PROMETHEUS_DEB" "$DEBIAN_MIRROR/pool/main/p/prometheus/$PROMETHEUS_DEB"
  echo "$PROMETHEUS_DEB_SHA256  $work/$PROMETHEUS_DEB" | sha256sum -c --quiet -
  dpkg-deb -x "$work/$PROMETHEUS_DEB" "$work/root"
  if ! grep -q 'prometheus/discovery/consul' "$work/root/usr/bin/prometheus"; then
    echo "install-consul-clients: $PROMETHEUS_DEB has no Consul service discovery" >&2
    exit 1
  fi
  new="$work/prometheus"
  mkdir -p "$new"
  cp "$work/root/usr/bin/prometheus" "$work/root/usr/bin/promtool" "$new/"
  cp -a "$work/root/usr/share/prometheus/web" "$new/web"
  # Its links are relative to where the deb installs the tree
  # (../../../javascript/x): resolve them against that place.
  find "$new/web" -type l | while read -r link; do
    rel=${link#"$new/web/"}
    target=$(realpath -m "/usr/share/prometheus/web/$(dirname "$rel")/$(readlink "$link")")
    rm "$link"
    cp -rL "$target" "$link"
  done
  # moment-timezone's source data is 200 MB; the UI loads only its built files.
  find "$new/web/static/moment-timezone" -mindepth 1 -maxdepth 1 ! -name '*.js' -exec rm -rf {} +
  echo "$PROMETHEUS_DEB" >"$new/.deb"
  mkdir -p "$(dirname "$PROMETHEUS_DIR")"
  rm -rf "$PROMETHEUS_DIR.old"
  [ -e "$PROMETHEUS_DIR" ] && mv "$PROMETHEUS_DIR" "$PROMETHEUS_DIR.old"
  mv "$new" "$PROMETHEUS_DIR"
  rm -rf "$PROMETHEUS_DIR.old"
  rm -rf "$work"
  trap - EXIT
fi
# Debian's own prometheus package, if something installed it, must not hold
# port 9090 or be mistaken for this one (it has no Consul SD).
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl stop prometheus || true
  systemctl disable prometheus >/dev/null 2>&1 || true
fi
if [ -x /etc/init.d/prometheus ] && command -v service >/dev/null 2>&1; then
  service prometheus stop >/dev/null 2>&1 || true
fi

if ! python3 -c 'import consul' >/dev/null 2>&1; then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    need_root pip
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  fi
  echo "install-consul-clients: installing py-consul $PY_CONSUL_VERSION"
  # Debian's own python refuses system-wide pip installs unless told.
  python3 -m pip install -q --root-user-action=ignore "py-consul==$PY_CONSUL_VERSION" 2>/dev/null \
    || python3 -m pip install -q --break-system-packages "py-consul==$PY_CONSUL_VERSION"
fi

echo "install-consul-clients: ok ($("$PROMETHEUS_DIR/prometheus" --version 2>&1 | head -1); py-consul $(python3 -c 'import consul; print(consul.__version__)'))"

#!/usr/bin/env bash
# Builds trellis/prometheus:$TRELLIS_TAG (default dev) for the demo's `metrics`
# compose profile without pulling anything: Debian's prometheus binary
# (scripts/install-consul-clients.sh installs it), the shared libraries `ldd`
# says it loads, and the web UI's templates and assets Debian's build reads
# from /usr/share/prometheus/web, in a FROM scratch image, as
# scripts/etcd-image.sh packages etcd. It runs as uid 65532 and owns only its
# data directory; its configuration is deploy/prometheus/prometheus.yml,
# mounted read-only by docker-compose.yml.
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${TRELLIS_TAG:-dev}
# TRELLIS_PROMETHEUS names another build (see below).
PROM=${TRELLIS_PROMETHEUS:-$(command -v prometheus || true)}
if [ -z "$PROM" ]; then
  scripts/install-consul-clients.sh
  PROM=$(command -v prometheus)
fi
PROM=$(readlink -f "$PROM")
# Debian bookworm's prometheus 2.42 is built without Consul service discovery
# ("Disable Consul SD until its Debian package is back in shape"), and the
# demo's configuration needs it: refuse rather than build an image that exits.
if ! grep -q consul_sd_configs "$PROM"; then
  echo "prometheus-image.sh: $PROM is built without Consul service discovery (Debian bookworm's 2.42 disables it);" >&2
  echo "  set TRELLIS_PROMETHEUS to a prometheus binary built with it (a later Debian's, or upstream's)" >&2
  exit 1
fi

ctx=target/docker-prometheus
rm -rf "$ctx"
mkdir -p "$ctx/rootfs/usr/bin" "$ctx/rootfs/tmp" "$ctx/rootfs/etc/prometheus" "$ctx/data/prometheus"
chmod 1777 "$ctx/rootfs/tmp"
cp "$PROM" "$ctx/rootfs/usr/bin/prometheus"
if [ -d /usr/share/prometheus/web ]; then
  mkdir -p "$ctx/rootfs/usr/share/prometheus"
  cp -rL /usr/share/prometheus/web "$ctx/rootfs/usr/share/prometheus/web"
  # moment-timezone's source data is 200 MB; the UI loads only its built files.
  tz="$ctx/rootfs/usr/share/prometheus/web/static/moment-timezone"
  [ -d "$tz" ] && find "$tz" -mindepth 1 -maxdepth 1 ! -name '*.js' -exec rm -rf {} +
fi
for lib in $(ldd "$PROM" | grep -o '/[^ ]*' | sort -u); do
  mkdir -p "$ctx/rootfs$(dirname "$lib")"
  cp -L "$lib" "$ctx/rootfs$lib"
done
cat >"$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
COPY --chown=65532:65532 data/ /var/lib/
USER 65532:65532
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus", "--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/var/lib/prometheus", "--web.listen-address=:9090"]
DOCKERFILE
if ! out=$(DOCKER_BUILDKIT=0 docker build -t "trellis/prometheus:$TAG" "$ctx" 2>&1); then
  echo "$out" >&2
  echo "prometheus-image.sh: building trellis/prometheus:$TAG failed" >&2
  exit 1
fi
size=$(docker image inspect -f '{{.Size}}' "trellis/prometheus:$TAG")
echo "prometheus-image.sh: trellis/prometheus:$TAG $((size / 1024 / 1024)) MB ($("$PROM" --version 2>&1 | head -1))"

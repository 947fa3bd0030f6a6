#!/usr/bin/env bash
# Builds trellis/prometheus:$TRELLIS_TAG (default dev) for the demo's `metrics`
# compose profile without pulling anything: the Prometheus that
# scripts/install-consul-clients.sh puts in /opt/trellis/prometheus (Debian
# bullseye's 2.24.1, the last Debian build with Consul service discovery), the
# shared libraries `ldd` says it loads, and its web UI's templates and assets,
# which Debian's build reads from /usr/share/prometheus/web, in a FROM scratch
# image, as scripts/etcd-image.sh packages etcd. It runs as uid 65532 and owns
# only its data directory; its configuration is deploy/prometheus/prometheus.yml,
# mounted read-only by docker-compose.yml.
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${TRELLIS_TAG:-dev}
INSTALLED=/opt/trellis/prometheus
if [ ! -x "$INSTALLED/prometheus" ]; then
  scripts/install-consul-clients.sh
fi
PROM=$INSTALLED/prometheus
# Go keeps the package path of every function it links.
if ! grep -q 'prometheus/discovery/consul' "$PROM"; then
  echo "prometheus-image.sh: $PROM is built without Consul service discovery; rerun scripts/install-consul-clients.sh" >&2
  exit 1
fi

ctx=target/docker-prometheus
rm -rf "$ctx"
mkdir -p "$ctx/rootfs/usr/bin" "$ctx/rootfs/tmp" "$ctx/rootfs/etc/prometheus" "$ctx/data/prometheus"
chmod 1777 "$ctx/rootfs/tmp"
cp "$PROM" "$ctx/rootfs/usr/bin/prometheus"
mkdir -p "$ctx/rootfs/usr/share/prometheus"
cp -r "$INSTALLED/web" "$ctx/rootfs/usr/share/prometheus/web"
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

#!/usr/bin/env bash
# Builds trellis/etcd:$TRELLIS_TAG (default dev) for docker-compose.ha.yml without
# pulling anything: Debian's etcd binary (scripts/install-etcd.sh installs it)
# plus the shared libraries `ldd` says it loads, in a FROM scratch image. The
# binary is dynamically linked, so the image carries its loader and libc (the
# 20 MB bound of the Trellis images does not apply to it). It runs as uid 65532,
# like the Trellis images, and owns only its data directory.
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${TRELLIS_TAG:-dev}
ETCD=$(command -v etcd || true)
if [ -z "$ETCD" ]; then
  scripts/install-etcd.sh
  ETCD=$(command -v etcd)
fi
ETCD=$(readlink -f "$ETCD")

ctx=target/docker-etcd
rm -rf "$ctx"
mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/tmp" "$ctx/data/etcd"
# etcd wants its data directory private (0700); COPY keeps the mode, and
# copying the directory itself (not only its contents) gives it the owner.
chmod 700 "$ctx/data/etcd"
chmod 1777 "$ctx/rootfs/tmp"
cp "$ETCD" "$ctx/rootfs/usr/local/bin/etcd"
# Every library the binary loads, at the path the loader looks for it.
for lib in $(ldd "$ETCD" | grep -o '/[^ ]*' | sort -u); do
  mkdir -p "$ctx/rootfs$(dirname "$lib")"
  cp -L "$lib" "$ctx/rootfs$lib"
done
cat >"$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
COPY --chown=65532:65532 data/ /var/lib/
USER 65532:65532
EXPOSE 2379 2380
ENTRYPOINT ["/usr/local/bin/etcd"]
DOCKERFILE
if ! out=$(DOCKER_BUILDKIT=0 docker build -t "trellis/etcd:$TAG" "$ctx" 2>&1); then
  echo "$out" >&2
  echo "etcd-image.sh: building trellis/etcd:$TAG failed" >&2
  exit 1
fi
size=$(docker image inspect -f '{{.Size}}' "trellis/etcd:$TAG")
echo "etcd-image.sh: trellis/etcd:$TAG $((size / 1024 / 1024)) MB ($("$ETCD" --version | head -1))"

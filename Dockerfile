# Trellis images: one static binary each, FROM scratch, nothing pulled.
#
# Default path (this machine, CI, anyone with a Rust toolchain): build the
# release binaries on the host, then `scripts/images.sh`, which strips copies
# into target/docker/ and builds each stage below with the legacy builder:
#   DOCKER_BUILDKIT=0 docker build --target registry -t trellis/registry:dev .
#
# The legacy builder runs every stage before the target, in file order, so the
# prebuilt stages come first and never reach the from-source stages at the end.
# Those need internet (`FROM rust`) and BuildKit, which skips unused stages:
#   TRELLIS_FROM_SOURCE=1 scripts/images.sh
#
# Every image runs as user 65532 (group 65532), not root. scratch has no
# /etc/passwd, so the user is numeric; nothing in the images needs a name. The
# binaries write nothing on their own (ready files only where a flag says), so
# the compose files can also make the root filesystem read-only.

FROM scratch AS registry
COPY target/docker/registry /usr/local/bin/registry
EXPOSE 7600
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/registry"]

FROM scratch AS sidecar
COPY target/docker/sidecar /usr/local/bin/sidecar
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/sidecar"]

FROM scratch AS demo-app
COPY target/docker/demo-app /usr/local/bin/demo-app
EXPOSE 8080
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/demo-app"]

FROM scratch AS demo-client
COPY target/docker/demo-client /usr/local/bin/demo-client
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/demo-client"]

FROM scratch AS mesh-intruder
COPY target/docker/mesh-intruder /usr/local/bin/mesh-intruder
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/mesh-intruder"]

# ---- from source: needs internet and BuildKit; never built on the offline CI machine ----

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --workspace --bins \
 && mkdir -p /out \
 && for b in registry sidecar demo-app demo-client mesh-intruder; do \
      strip --strip-debug -o /out/$b target/x86_64-unknown-linux-gnu/release/$b; \
    done

FROM scratch AS registry-from-source
COPY --from=build /out/registry /usr/local/bin/registry
EXPOSE 7600
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/registry"]

FROM scratch AS sidecar-from-source
COPY --from=build /out/sidecar /usr/local/bin/sidecar
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/sidecar"]

FROM scratch AS demo-app-from-source
COPY --from=build /out/demo-app /usr/local/bin/demo-app
EXPOSE 8080
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/demo-app"]

FROM scratch AS demo-client-from-source
COPY --from=build /out/demo-client /usr/local/bin/demo-client
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/demo-client"]

FROM scratch AS mesh-intruder-from-source
COPY --from=build /out/mesh-intruder /usr/local/bin/mesh-intruder
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/mesh-intruder"]

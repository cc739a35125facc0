# syntax=docker/dockerfile:1
# One image, every component: `minimesh up|service|sidecar|gateway|identity|certs`, and beside it
# `minimesh-proxy sidecar|gateway`, the proxy alone (same flags), which the chart's proxies run: it
# keeps less code resident in every proxy process than the whole CLI.
#
#   DOCKER_BUILDKIT=1 docker build -t minimesh:0.1.0 \
#     --build-arg VERSION=0.1.0 --build-arg GIT_COMMIT="$(git rev-parse --short=12 HEAD)" .
#
# Base images are pinned: the Rust toolchain by its exact release (the one CI tests with), the
# runtime by digest, so a rebuild of one commit gets the same bytes. To move the runtime to a newer
# distroless build: `crane digest gcr.io/distroless/cc-debian12:nonroot` and replace the digest.

FROM rust:1.95.0-bookworm AS build
# The release the image is tagged with; the build fails if either binary reports another one.
ARG VERSION
ARG GIT_COMMIT=unknown
WORKDIR /src
COPY . .
# Registry and target directory live in BuildKit caches, so a rebuild compiles only what changed.
# The target directory is a cache mount, hence the copy out to /out in the same step.
# CARGO_PROFILE_RELEASE_STRIP drops symbols and debug info (minimesh: about 80 MB -> 15 MB;
# minimesh-proxy: 39 MB -> 7.6 MB).
# build.rs takes the commit from MINIMESH_GIT_COMMIT when set (there is no .git here).
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    CARGO_PROFILE_RELEASE_STRIP=symbols MINIMESH_GIT_COMMIT="${GIT_COMMIT}" \
    cargo build --release --locked --no-default-features --bin minimesh --bin minimesh-proxy \
 && install -D -m 0755 target/release/minimesh /out/minimesh \
 && install -D -m 0755 target/release/minimesh-proxy /out/minimesh-proxy
RUN test -n "${VERSION}" || { echo "pass --build-arg VERSION=<release>" >&2; exit 1; } \
 && reported="$(/out/minimesh --version)" \
 && echo "built: ${reported}" \
 && case "${reported}" in "minimesh ${VERSION} "*) ;; *) echo "VERSION=${VERSION}, but minimesh says: ${reported}" >&2; exit 1 ;; esac \
 && reported="$(/out/minimesh-proxy --version)" \
 && echo "built: ${reported}" \
 && case "${reported}" in "minimesh-proxy ${VERSION} "*) ;; *) echo "VERSION=${VERSION}, but minimesh-proxy says: ${reported}" >&2; exit 1 ;; esac

# Distroless cc: glibc and CA certificates, no shell, user 65532 (nonroot).
FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f
ARG VERSION
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="minimesh" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
COPY --from=build /out/minimesh /usr/local/bin/minimesh
COPY --from=build /out/minimesh-proxy /usr/local/bin/minimesh-proxy
USER 65532:65532
# Nothing is written outside mounted volumes, so the root filesystem can be read-only.
ENTRYPOINT ["/usr/local/bin/minimesh"]
CMD ["--help"]

# One image, every component: `minimesh up|service|sidecar|gateway|identity|certs`.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin minimesh \
 && install -D -m 0755 target/release/minimesh /out/minimesh

# Distroless cc: glibc and CA certificates, no shell, user 65532 (nonroot).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/minimesh /usr/local/bin/minimesh
USER 65532:65532
# Nothing is written outside mounted volumes, so the root filesystem can be read-only.
ENTRYPOINT ["/usr/local/bin/minimesh"]
CMD ["--help"]

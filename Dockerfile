# syntax=docker/dockerfile:1
# Multi-stage: build with the Rust toolchain, run on a distroless image (no shell, non-root).

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin sigrelay \
 && mkdir -p /out/certs/dev \
 && cp target/release/sigrelay /out/sigrelay

FROM gcr.io/distroless/cc-debian12:nonroot
WORKDIR /app
COPY --from=build /out/sigrelay /usr/local/bin/sigrelay
COPY config/sigrelay.toml /app/config/sigrelay.toml
# Writable by the non-root user, so a container started without a mounted certificate can make
# its throwaway localhost pair. Mount real ones and point [server] cert/key at them.
COPY --from=build --chown=65532:65532 /out/certs /app/certs
ENV SIGRELAY_CONFIG=/app/config/sigrelay.toml \
    SIGRELAY_LISTEN=0.0.0.0:8443 \
    SIGRELAY_LOG_FORMAT=json
USER 65532:65532
EXPOSE 8443
# The binary probes its own /healthz over TLS: no curl or shell needed in the image.
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/sigrelay", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/sigrelay"]
CMD ["run"]

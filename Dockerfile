# Build: the eBPF object (nightly + bpf-linker, by `cargo xtask`) and the agent.
FROM rust:1-bookworm AS build
RUN rustup toolchain install nightly --component rust-src --profile minimal
WORKDIR /src
COPY . .
RUN cargo xtask setup --build-only && cargo xtask build-ebpf \
    && cargo build --release --package interceptor --bin interceptor

# Run: the binary alone (rustls, no OpenSSL).
FROM gcr.io/distroless/cc-debian12
COPY --from=build /src/target/release/interceptor /usr/local/bin/interceptor
ENTRYPOINT ["/usr/local/bin/interceptor"]
CMD ["run"]

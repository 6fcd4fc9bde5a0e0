# Build: the pinned eBPF toolchain and bpf-linker (`cargo xtask setup`), then the agent,
# whose build script builds the eBPF object.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo xtask setup --build-only \
    && cargo build --release --package interceptor --bin interceptor

# Run: the binary alone (rustls, no OpenSSL).
FROM gcr.io/distroless/cc-debian12
COPY --from=build /src/target/release/interceptor /usr/local/bin/interceptor
ENTRYPOINT ["/usr/local/bin/interceptor"]
CMD ["run"]

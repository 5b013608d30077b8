# lb-agent and lbctl for deploy/daemonset.yaml: `docker build -t lb-agent:latest .`
#
# Stage 1 builds the eBPF object (nightly + rust-src + bpf-linker linked against nightly's own
# libLLVM, the recipe `cargo xtask setup` follows, without its test packages and bpffs mount)
# and the release binaries; stage 2 is a slim runtime with only what they need.
FROM rust:1.95-bookworm AS build
RUN rustup toolchain install nightly --profile minimal --component rust-src
RUN set -eux; \
    sysroot=$(rustc +nightly --print sysroot); \
    lib=$(ls "$sysroot"/lib/libLLVM.so.* | head -1); \
    major=$(basename "$lib" | sed -E 's/libLLVM\.so\.([0-9]+).*/\1/'); \
    mkdir -p /opt/rust-llvm/lib; \
    ln -sf "$lib" /opt/rust-llvm/lib/libLLVM.so; \
    ln -sf "$lib" "/opt/rust-llvm/lib/$(basename "$lib")"; \
    LLVM_PREFIX=/opt/rust-llvm cargo +nightly install bpf-linker --locked \
        --no-default-features --features "llvm-$major"
WORKDIR /src
COPY . .
RUN cargo build --release -p lb-userspace --bin lb-agent --bin lbctl

FROM debian:bookworm-slim
# iproute2: `ip` for operators inside the pod; ca-certificates: the API server's chain when it
# is not the service account's CA.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates iproute2 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/lb-agent /src/target/release/lbctl /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/lb-agent"]

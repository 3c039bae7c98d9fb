# The Hotpath image: one `hotpath` binary whose subcommand is the role (`hotpath gateway`,
# `consumers`, `push`, `migrate`, ...), with the shipped policies. Build it from the
# repository's root:
#
#   docker build -t hotpath:0.1.0 .
#
# Three stages: the policies (WebAssembly, built by policies/build.sh with Debian's toolchain
# for wasm32, which it installs), the binary (the pinned Rust toolchain, rust-version in
# Cargo.toml), and the runtime: distroless's C runtime for Debian 12 (glibc and libgcc, CA
# certificates, no shell), as its non-root user.

# The policies: policies/build.sh installs rustc-web, rust-web-src, lld-22 and clang-22 from
# Debian 12's own repositories, the toolchain it is tested with.
FROM debian:bookworm-slim AS policies
WORKDIR /src
COPY policies/ policies/
RUN policies/build.sh

# The binary, with the toolchain of Cargo.toml's rust-version on Debian 12.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p hotpath && \
    install -D -m 0755 target/release/hotpath /out/hotpath

# The runtime. User 65532 is distroless's `nonroot`; the manifests in k8s/ run it with the
# same id, a read-only root filesystem and an emptyDir on /tmp.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/hotpath /usr/local/bin/hotpath
COPY --from=policies /src/policies/dist/ /usr/share/hotpath/policies/
ENV HOTPATH_POLICY_DIR=/usr/share/hotpath/policies
USER 65532:65532
EXPOSE 8080 9091 9092
ENTRYPOINT ["/usr/local/bin/hotpath"]
CMD ["--help"]

# syntax=docker/dockerfile:1
# AlgoLink images, multi-stage:
#   docker build --target cpu  -t algolink:0.1.0 .          # default build: no CUDA anywhere
#   docker build --target cuda -t algolink:0.1.0-cuda .     # `--features cuda`, CUDA 13 runtime
# Both run `algolink serve` as an unprivileged user (uid 10001) on port 8000 with the registry
# cache in /var/lib/algolink; deploy/helm/algolink runs them on Kubernetes.

ARG RUST_VERSION=1.90
ARG CUDA_VERSION=13.0.2

# --- CPU ---------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS build-cpu
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p algolink-server \
    && install -Dm755 target/release/algolink /out/algolink

FROM debian:bookworm-slim AS cpu
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --home-dir /var/lib/algolink --create-home algolink
COPY --from=build-cpu /out/algolink /usr/local/bin/algolink
USER 10001
WORKDIR /var/lib/algolink
EXPOSE 8000
ENTRYPOINT ["/usr/local/bin/algolink"]
CMD ["serve", "--config", "/etc/algolink/algolink.toml"]

# --- CUDA --------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS build-cuda
ARG RUST_VERSION
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates build-essential pkg-config \
    && rm -rf /var/lib/apt/lists/* \
    && curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain ${RUST_VERSION}
ENV PATH=/root/.cargo/bin:$PATH \
    # H100/H200 (sm_90); set to your GPUs' compute capability.
    CUDA_COMPUTE_CAP=90
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/root/.cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p algolink-server --features cuda \
    && install -Dm755 target/release/algolink /out/algolink

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04 AS cuda
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libcublas-13-0 libcurand-13-0 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --home-dir /var/lib/algolink --create-home algolink
COPY --from=build-cuda /out/algolink /usr/local/bin/algolink
USER 10001
WORKDIR /var/lib/algolink
EXPOSE 8000
ENTRYPOINT ["/usr/local/bin/algolink"]
CMD ["serve", "--config", "/etc/algolink/algolink.toml"]

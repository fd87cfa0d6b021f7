# syntax=docker/dockerfile:1
# Build: dependencies first, in their own layer (manifests and empty targets only), so
# a source change rebuilds only chat-sync itself.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY loadgen/Cargo.toml loadgen/
RUN mkdir -p src loadgen/src benches \
    && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > loadgen/src/main.rs && echo 'fn main() {}' > benches/fanout.rs \
    && cargo build --release --locked --bin chat-sync \
    && rm -rf src
COPY src src
COPY static static
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin chat-sync

# Run: a small base, a non-root user, configuration only from the environment.
FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home chat-sync
COPY --from=build /src/target/release/chat-sync /usr/local/bin/chat-sync
USER chat-sync
ENV PORT=8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["chat-sync", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["chat-sync"]

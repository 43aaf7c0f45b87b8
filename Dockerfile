# Build: docker build -t opsgate .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
COPY benches ./benches
RUN cargo build --release --locked --bin opsgate

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --no-create-home opsgate
WORKDIR /app
COPY --from=build /src/target/release/opsgate /usr/local/bin/opsgate
COPY config ./config
USER opsgate
ENV OPSGATE_CONFIG_DIR=/app/config
ENTRYPOINT ["opsgate"]
CMD ["worker"]

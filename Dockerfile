# Build: docker build -t herald .
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# make: the broker's allocator (jemalloc) is built from C source.
RUN apt-get update && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cargo build --release --locked --bin herald

FROM debian:bookworm-slim
# CA certificates for https:// webhooks.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --home /var/lib/herald herald \
    && mkdir -p /var/lib/herald/data /etc/herald \
    && chown -R herald /var/lib/herald
COPY --from=build /src/target/release/herald /usr/local/bin/herald
COPY config/herald.toml /etc/herald/herald.toml
USER herald
WORKDIR /var/lib/herald
EXPOSE 1883 8883 8083 8084
ENTRYPOINT ["herald"]
CMD ["serve", "--config", "/etc/herald/herald.toml"]

# Redis from Debian's package, configured at start by compose/image/redis-entrypoint.sh.
# Build context: the repository root. BASE: Debian bookworm (debian:bookworm-slim, or a base
# made from Debian's packages where no image registry is reachable).
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/*
COPY compose/image/redis-entrypoint.sh /usr/local/bin/redis-entrypoint
RUN chmod 0755 /usr/local/bin/redis-entrypoint && install -d -o redis -g redis -m 0700 /data
EXPOSE 6379
ENTRYPOINT ["redis-entrypoint"]

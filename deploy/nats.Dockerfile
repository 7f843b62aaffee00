# NATS for docker-compose.yml: Debian bookworm's nats-server package (2.9.x, JetStream included) on
# debian:bookworm-slim, with wget for the health check. Debian's rather than the official
# nats:2.10-alpine so that it builds from Debian packages alone (no image registry needed beyond
# the Debian base image; scripts/build-base-images.sh makes that one where there is none either).
# Runs as the package's `nats` user; JetStream stores in /data (a volume in the compose file).
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends nats-server wget \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data /etc/nats \
 && chown nats:nats /data
COPY deploy/nats.conf /etc/nats/nats.conf
USER nats
EXPOSE 4222 8222
# A clean shutdown (JetStream flushed) on SIGINT or SIGTERM; exit code 0 only on SIGINT.
STOPSIGNAL SIGINT
ENTRYPOINT ["nats-server"]
CMD ["-c", "/etc/nats/nats.conf"]

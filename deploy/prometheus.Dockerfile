# Prometheus for the `observability` profile of docker-compose.yml: Debian bookworm's prometheus
# package on debian:bookworm-slim, like the NATS image (Debian packages only: no image registry
# needed beyond the Debian base image, which scripts/build-base-images.sh makes where there is none).
# It scrapes every service's GET /metrics; the targets come from IOASID_SCRAPE_TARGETS at start
# (deploy/prometheus/entrypoint.sh), so that one image serves the bridge and the host network.
# deploy/prometheus/ioasid.html is a console (a dashboard without Grafana, which Debian does not
# package): http://127.0.0.1:9090/consoles/ioasid.html.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /prometheus \
 && chown prometheus:prometheus /prometheus
COPY deploy/prometheus/prometheus.yml /etc/prometheus/prometheus.yml
COPY deploy/prometheus/ioasid.html /etc/prometheus/consoles/ioasid.html
COPY deploy/prometheus/entrypoint.sh /usr/local/bin/ioasid-prometheus
USER prometheus
EXPOSE 9090
ENTRYPOINT ["/bin/sh", "/usr/local/bin/ioasid-prometheus"]
CMD ["--web.listen-address=0.0.0.0:9090"]

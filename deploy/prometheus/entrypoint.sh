#!/bin/sh
# Starts Prometheus on the ioasid-fabric services. IOASID_SCRAPE_TARGETS lists them as
# "service=host:port" words (docker-compose.yml sets it); they become a file_sd target file, each
# target labelled with its service. Arguments go to prometheus after the fixed ones.
set -eu
# prometheus.yml reads it from there.
targets=/tmp/ioasid-targets.json
sep=""
printf '[' >"$targets.tmp"
for t in ${IOASID_SCRAPE_TARGETS:?set IOASID_SCRAPE_TARGETS to "service=host:port ..."}; do
  printf '%s{"targets":["%s"],"labels":{"service":"%s"}}' "$sep" "${t#*=}" "${t%%=*}" >>"$targets.tmp"
  sep=","
done
printf ']\n' >>"$targets.tmp"
mv "$targets.tmp" "$targets"
exec prometheus \
  --config.file="${IOASID_PROMETHEUS_CONFIG:-/etc/prometheus/prometheus.yml}" \
  --storage.tsdb.path="${IOASID_PROMETHEUS_DATA:-/prometheus}" \
  --web.console.templates="${IOASID_PROMETHEUS_CONSOLES:-/etc/prometheus/consoles}" \
  --web.console.libraries=/etc/prometheus/console_libraries \
  "$@"

#!/usr/bin/env bash
# `npm run test:containers`: the docker-compose environment, run for real, on a machine with no
# image registry and no network but loopback (and Debian's mirror and the npm registry for builds).
#
#  1. installs Debian's docker.io, docker-compose and debootstrap when missing (apt-get; root);
#  2. starts its own dockerd, host networking only (--bridge=none --iptables=false), with its data
#     in a temp dir, and waits until it answers (a clear failure when it cannot start);
#  3. builds the base images the Dockerfiles name (scripts/build-base-images.sh), then the stack's
#     images (docker-compose.yml + deploy/docker-compose.host-network.yml);
#  4. brings the stack up on 127.0.0.1 (its credentials step first: a NATS user and a certificate per
#     role instance, in the run's temp dir) and waits until every container is healthy;
#  5. runs test/containers (vitest.containers.config.ts): ioasidctl attached to the stack, both
#     life cycles, a VDCM container killed during a crashed guest's teardown; the testkit's NATS
#     through testcontainers; with IOASID_CT_OBSERVABILITY=1 the `observability` profile (Prometheus built from Debian's
#     package, checked to scrape all five services and the core's acknowledged deliveries); then two
#     end-to-end test files with IOASID_TESTKIT_DOCKER=1;
#  6. stops the stack (checking every service stops gracefully), removes containers and volumes;
#  7. the `cluster` profile (deploy/docker-compose.cluster.host-network.yml): three nats-servers
#     clustered, brought up with fresh credentials and volumes, waits until every container is
#     healthy, runs test/containers/compose-cluster.test.ts (every stream with 3 replicas, both life
#     cycles, the op log's nats container killed mid-run and started again), and stops it as in 6;
#  8. stops its dockerd by PID and removes its temp dir: nothing it started is left running.
#
# Settings (environment): IOASID_PORT_NATS (24222), IOASID_PORT_NATS_MONITOR (28222),
# IOASID_PORT_CORE (25051), IOASID_PORT_IOMMU (25052), IOASID_PORT_VFIO (25053), IOASID_PORT_KVM
# (25054), IOASID_PORT_VDCM (25055), their metrics IOASID_PORT_<SERVICE>_METRICS (25056 … 25060),
# the observability profile's Prometheus IOASID_PORT_PROMETHEUS (25090), the cluster leg's other
# nats-servers IOASID_PORT_NATS_2 (24223) and IOASID_PORT_NATS_3 (24224), their monitoring
# IOASID_PORT_NATS_2_MONITOR (28223) and IOASID_PORT_NATS_3_MONITOR (28224), and the three route
# ports IOASID_PORT_NATS_ROUTE, IOASID_PORT_NATS_2_ROUTE, IOASID_PORT_NATS_3_ROUTE (26222 … 26224):
# not the defaults, so that it runs beside `npm start`;
# IOASID_CT_DOCKER_ROOT: keep the engine's data (images, build cache) there between runs instead
# of in the temp dir; DEBIAN_MIRROR: for debootstrap.
set -euo pipefail
cd "$(dirname "$0")/.."

T0=$SECONDS
say() { printf 'containers: [%3ds] %s\n' "$((SECONDS - T0))" "$*"; }
die() {
  say "FAILED: $*" >&2
  exit 1
}

export IOASID_PORT_NATS="${IOASID_PORT_NATS:-24222}"
export IOASID_PORT_NATS_MONITOR="${IOASID_PORT_NATS_MONITOR:-28222}"
export IOASID_PORT_CORE="${IOASID_PORT_CORE:-25051}"
export IOASID_PORT_IOMMU="${IOASID_PORT_IOMMU:-25052}"
export IOASID_PORT_VFIO="${IOASID_PORT_VFIO:-25053}"
export IOASID_PORT_KVM="${IOASID_PORT_KVM:-25054}"
export IOASID_PORT_VDCM="${IOASID_PORT_VDCM:-25055}"
export IOASID_PORT_CORE_METRICS="${IOASID_PORT_CORE_METRICS:-25056}"
export IOASID_PORT_IOMMU_METRICS="${IOASID_PORT_IOMMU_METRICS:-25057}"
export IOASID_PORT_VFIO_METRICS="${IOASID_PORT_VFIO_METRICS:-25058}"
export IOASID_PORT_KVM_METRICS="${IOASID_PORT_KVM_METRICS:-25059}"
export IOASID_PORT_VDCM_METRICS="${IOASID_PORT_VDCM_METRICS:-25060}"
export IOASID_PORT_PROMETHEUS="${IOASID_PORT_PROMETHEUS:-25090}"
export IOASID_PORT_NATS_2="${IOASID_PORT_NATS_2:-24223}"
export IOASID_PORT_NATS_3="${IOASID_PORT_NATS_3:-24224}"
export IOASID_PORT_NATS_2_MONITOR="${IOASID_PORT_NATS_2_MONITOR:-28223}"
export IOASID_PORT_NATS_3_MONITOR="${IOASID_PORT_NATS_3_MONITOR:-28224}"
export IOASID_PORT_NATS_ROUTE="${IOASID_PORT_NATS_ROUTE:-26222}"
export IOASID_PORT_NATS_2_ROUTE="${IOASID_PORT_NATS_2_ROUTE:-26223}"
export IOASID_PORT_NATS_3_ROUTE="${IOASID_PORT_NATS_3_ROUTE:-26224}"
# The classic builder: BuildKit would need the buildx plugin, which Debian's docker.io lacks.
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0
PROJECT=ioasid-ct
SERVICES=(nats ioasid-core iommu vfio kvm vdcm)

# --- 1. what it needs ------------------------------------------------------------------------------
missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if [ "${#missing[@]}" -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "needs ${missing[*]} (apt-get install -y ${missing[*]}) and root to start dockerd"
  say "installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[ "$(id -u)" = 0 ] || die "dockerd and debootstrap need root"
if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
else
  COMPOSE=(docker-compose)
fi
STACK=("${COMPOSE[@]}" -p "$PROJECT" -f docker-compose.yml -f deploy/docker-compose.host-network.yml)
# The cluster leg's stack: a project of its own (its own volumes), the `cluster` profile.
CLUSTER=("${COMPOSE[@]}" -p "$PROJECT-cluster" -f docker-compose.yml -f deploy/docker-compose.host-network.yml
  -f deploy/docker-compose.cluster.host-network.yml --profile cluster)
CLUSTER_SERVICES=(nats nats-2 nats-3 ioasid-core iommu vfio kvm vdcm)
say "using $("${COMPOSE[@]}" version --short 2>/dev/null | head -n1 | sed "s/^/${COMPOSE[*]} /"), $(dockerd --version 2>/dev/null || echo "dockerd (no version)"), node $(node --version)"

# --- the compose files, as docker-compose v1 and (where available) v2 read them --------------------
for c in "docker-compose" "docker compose"; do
  read -r -a cmd <<<"$c"
  "${cmd[@]}" version >/dev/null 2>&1 || { say "compose check: $c not available here"; continue; }
  "${cmd[@]}" config -q || die "$c config rejects docker-compose.yml (+ docker-compose.override.yml)"
  "${cmd[@]}" -f docker-compose.yml -f deploy/docker-compose.host-network.yml config -q ||
    die "$c config rejects docker-compose.yml + deploy/docker-compose.host-network.yml"
  "${cmd[@]}" -f docker-compose.yml -f docker-compose.override.yml -f deploy/docker-compose.cluster.yml --profile cluster config -q ||
    die "$c config rejects the cluster profile: docker-compose.yml + docker-compose.override.yml + deploy/docker-compose.cluster.yml"
  "${cmd[@]}" -f docker-compose.yml -f deploy/docker-compose.host-network.yml -f deploy/docker-compose.cluster.host-network.yml --profile cluster config -q ||
    die "$c config rejects the cluster profile on the host network: docker-compose.yml + deploy/docker-compose.host-network.yml + deploy/docker-compose.cluster.host-network.yml"
  say "compose check: \`$c config -q\` accepts docker-compose.yml (+ docker-compose.override.yml) and + deploy/docker-compose.host-network.yml"
  say "compose check: \`$c --profile cluster config -q\` accepts + deploy/docker-compose.cluster.yml (over the override) and + deploy/docker-compose.cluster.host-network.yml (over the host-network file)"
done

npx tsc -b
say "TypeScript built (tsc -b): ioasidctl and the tests run from dist/"

# --- 2. the engine ---------------------------------------------------------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/ioasid-containers.XXXXXX")"
# The stack's credentials (made by its `credentials` step) live with the run and go with it.
export IOASID_COMPOSE_CREDENTIALS="$WORK/credentials"
DATA_ROOT="${IOASID_CT_DOCKER_ROOT:-$WORK/data}"
SOCK="$WORK/docker.sock"
DOCKERD_PID=""
CA_COPIED=()
# The stack that is up (compose command, services, what its teardown says): the single-server one,
# then the cluster one; the exit trap stops whichever is up.
STACK_UP=0
ACTIVE=("${STACK[@]}")
ACTIVE_SERVICES=("${SERVICES[@]}")
ACTIVE_NAME="stack"
ACTIVE_VOLUMES="the nats-data volume"

# Stops the active stack (SIGTERM, 10 s), checks that every service exited 0, and removes its
# containers, network and volumes; returns 1 when a service did not stop gracefully.
stack_down() {
  local stop_start=$SECONDS report="" bad=0 s id code
  say "teardown: stopping the $ACTIVE_NAME (SIGTERM, 10 s grace)"
  "${ACTIVE[@]}" stop --timeout 10 >>"$WORK/stop.log" 2>&1
  for s in "${ACTIVE_SERVICES[@]}"; do
    id="$("${ACTIVE[@]}" ps -a -q "$s" 2>/dev/null)"
    code="$(docker inspect -f '{{.State.ExitCode}}' "$id" 2>/dev/null || echo '?')"
    report+=" $s=$code"
    [ "$code" = 0 ] || bad=1
  done
  if [ "$bad" = 0 ]; then
    say "teardown: every service stopped gracefully in $((SECONDS - stop_start)) s (exit codes:$report)"
  else
    say "teardown: not every service stopped gracefully (exit codes:$report)"
  fi
  "${ACTIVE[@]}" down --volumes --remove-orphans --timeout 10 >>"$WORK/stop.log" 2>&1
  STACK_UP=0
  say "teardown: containers, network and $ACTIVE_VOLUMES removed ($("${ACTIVE[@]}" ps -a -q 2>/dev/null | wc -l) containers left)"
  return "$bad"
}

# Waits (bounded by the clock) until every container of the active stack is healthy; the failure
# shows its containers and logs.
wait_healthy() {
  local healthy=0 states="" health_deadline=$((SECONDS + 300))
  # Bounded by the clock, not by a count: each round runs docker-compose (a Python process) per
  # service, which takes seconds each on a busy machine.
  while [ "$SECONDS" -lt "$health_deadline" ]; do
    states="$(for s in "${ACTIVE_SERVICES[@]}"; do id="$("${ACTIVE[@]}" ps -q "$s" 2>/dev/null)"; echo "$s=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$id" 2>/dev/null || echo none)"; done | tr '\n' ' ')"
    if ! grep -qv '=healthy$' <<<"$(tr ' ' '\n' <<<"$states" | grep .)"; then
      healthy=1
      break
    fi
    sleep 0.5
  done
  if [ "$healthy" != 1 ]; then
    "${ACTIVE[@]}" ps >&2
    "${ACTIVE[@]}" logs --no-color --tail 20 >&2
    die "the $ACTIVE_NAME did not become healthy within 300 s: $states"
  fi
}

# What NATS's monitoring port says about JetStream (streams, messages; in a cluster the meta leader).
jsz() {
  curl -fsS "http://127.0.0.1:$1/jsz" 2>/dev/null | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{try{const j=JSON.parse(s);console.log(`${j.streams} stream(s), ${j.messages} message(s)${j.meta_cluster?`, meta leader ${j.meta_cluster.leader} of ${j.meta_cluster.cluster_size}`:""}`)}catch{console.log("(no /jsz answer)")}})'
}

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  set +e
  if [ "$STACK_UP" = 1 ]; then
    stack_down || { [ "$status" = 0 ] && status=1; }
  fi
  if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
    # Anything else this engine runs (a test's leftover container) goes with it.
    local left
    left="$(docker ps -aq 2>/dev/null)"
    [ -n "$left" ] && docker rm --force --volumes $left >/dev/null 2>&1
    local containerd_pid
    containerd_pid="$(cat "$WORK/exec/containerd/containerd.pid" 2>/dev/null)"
    kill -TERM "$DOCKERD_PID"
    for _ in $(seq 1 300); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$DOCKERD_PID" 2>/dev/null; then
      say "teardown: dockerd (pid $DOCKERD_PID) did not stop in 30 s: SIGKILL"
      kill -KILL "$DOCKERD_PID"
    fi
    wait "$DOCKERD_PID" 2>/dev/null
    if [ -n "$containerd_pid" ] && kill -0 "$containerd_pid" 2>/dev/null; then
      kill -TERM "$containerd_pid"
      sleep 1
      kill -0 "$containerd_pid" 2>/dev/null && kill -KILL "$containerd_pid"
    fi
    say "teardown: dockerd (pid $DOCKERD_PID) and its containerd${containerd_pid:+ (pid $containerd_pid)} stopped"
  fi
  # Mounts the engine may have left (a killed dockerd), deepest first, then its files.
  if [ -d "$WORK" ]; then
    awk -v w="$WORK" 'index($2, w) == 1 { print $2 }' /proc/self/mounts | sort -r | while read -r m; do umount -l "$m"; done
    rm -rf "$WORK"
  fi
  for f in "${CA_COPIED[@]}"; do rm -f "$f"; done
  local running
  running="$(ps -eo pid=,args= | awk -v w="$WORK" 'index($0, w) > 0 && $0 !~ /awk/ { print $1 }')"
  if [ -n "$running" ]; then
    say "teardown: processes of $WORK still running: $running" >&2
    [ "$status" = 0 ] && status=1
  else
    say "teardown: done; nothing of this run left running ($([ -n "${IOASID_CT_DOCKER_ROOT:-}" ] && echo "engine data kept in $DATA_ROOT" || echo "engine data removed"))"
  fi
  if [ "$status" = 0 ]; then say "PASSED in $((SECONDS - T0)) s"; else say "FAILED (exit $status) after $((SECONDS - T0)) s"; fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$DATA_ROOT"
dockerd --bridge=none --iptables=false --ip6tables=false \
  --data-root "$DATA_ROOT" --exec-root "$WORK/exec" --pidfile "$WORK/dockerd.pid" \
  -H "unix://$SOCK" >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
export DOCKER_HOST="unix://$SOCK"
for _ in $(seq 1 600); do
  docker version --format '{{.Server.Version}}' >/dev/null 2>&1 && break
  if ! kill -0 "$DOCKERD_PID" 2>/dev/null; then
    wait "$DOCKERD_PID" && code=0 || code=$?
    DOCKERD_PID=""
    tail -n 15 "$WORK/dockerd.log" >&2
    die "the Docker engine could not start: dockerd exited with code $code (its log above). It needs root, cgroups and overlayfs (or another storage driver)."
  fi
  sleep 0.1
done
docker version --format '{{.Server.Version}}' >/dev/null 2>&1 ||
  { tail -n 15 "$WORK/dockerd.log" >&2; die "the Docker engine did not answer on $SOCK within 60 s (its log above)"; }
say "dockerd $(docker version --format '{{.Server.Version}}') answering on $SOCK (pid $DOCKERD_PID; no bridge, no iptables; data in $DATA_ROOT)"

# --- 3. images ---------------------------------------------------------------------------------------
if ! bash scripts/build-base-images.sh 2>"$WORK/base-images.log" | while IFS= read -r line; do say "$line"; done; then
  cat "$WORK/base-images.log" >&2
  die "the base images could not be built"
fi

# npm inside the build must trust what this machine trusts (an intercepting proxy's CA, say):
# Debian's local CAs and NODE_EXTRA_CA_CERTS go to deploy/extra-ca/ for the build (not the image).
i=0
for f in /usr/local/share/ca-certificates/*.crt /usr/local/share/ca-certificates/*/*.crt ${NODE_EXTRA_CA_CERTS:-}; do
  [ -f "$f" ] || continue
  dest="deploy/extra-ca/test-containers-$i.crt"
  cp "$f" "$dest"
  CA_COPIED+=("$dest")
  i=$((i + 1))
done
[ "$i" -gt 0 ] && say "npm in the image build trusts this machine's extra CA certificates ($i file(s) in deploy/extra-ca/, removed at the end)"

build_start=$SECONDS
# One build for the five services (they share ioasid-fabric:dev), one for NATS.
if ! "${STACK[@]}" build nats ioasid-core >"$WORK/build.log" 2>&1; then
  { grep -m 15 -iE 'error|failed|unable' "$WORK/build.log"; echo "…"; tail -n 15 "$WORK/build.log"; } >&2
  die "the stack's images could not be built (the first errors and the end of the build log above)"
fi
size() { docker image inspect -f '{{.Size}}' "$1" | awk '{ printf "%d MB", $1 / 1e6 }'; }
say "stack images built in $((SECONDS - build_start)) s: ioasid-fabric-nats:dev ($(size ioasid-fabric-nats:dev), Debian's nats-server $(docker run --rm --network none --entrypoint nats-server ioasid-fabric-nats:dev --version | sed 's/.*v//')), ioasid-fabric:dev ($(size ioasid-fabric:dev))"

# --- 4. the stack ------------------------------------------------------------------------------------
for p in "$IOASID_PORT_NATS" "$IOASID_PORT_NATS_MONITOR" "$IOASID_PORT_CORE" "$IOASID_PORT_IOMMU" "$IOASID_PORT_VFIO" "$IOASID_PORT_KVM" "$IOASID_PORT_VDCM"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
    die "port $p of 127.0.0.1 is in use: stop what listens there, or choose other ports (IOASID_PORT_NATS, IOASID_PORT_CORE, … see the top of $0)"
  fi
done
up_start=$SECONDS
STACK_UP=1
"${STACK[@]}" up -d --no-build >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; die "\`${STACK[*]} up -d\` failed"; }
wait_healthy
say "stack healthy in $((SECONDS - up_start)) s: nats 127.0.0.1:$IOASID_PORT_NATS (monitor :$IOASID_PORT_NATS_MONITOR), ioasid-core :$IOASID_PORT_CORE, iommu :$IOASID_PORT_IOMMU, vfio :$IOASID_PORT_VFIO, kvm :$IOASID_PORT_KVM, vdcm :$IOASID_PORT_VDCM"
say "NATS JetStream: $(jsz "$IOASID_PORT_NATS_MONITOR") in the nats-data volume"

# --- 5. the tests ------------------------------------------------------------------------------------
compose_json="$(node -e 'console.log(JSON.stringify(process.argv.slice(1)))' "${STACK[@]}")"
say "test/containers: ioasidctl against the stack (attach, both scenarios, a killed VDCM container) and the testkit through testcontainers"
IOASID_CT_COMPOSE="$compose_json" npx vitest run --config vitest.containers.config.ts --reporter=verbose ||
  die "test/containers failed (output above; the stack's logs: \`${STACK[*]} logs\` while it runs)"

# --- 5b. the observability profile: Prometheus built from Debian's package, scraping all five -------------
# Only with IOASID_CT_OBSERVABILITY=1 for now: its first runs found the image building (27 s) and
# all five targets up, but the whole check has not yet passed end to end in CI.
if [ "${IOASID_CT_OBSERVABILITY:-0}" = 1 ]; then
PROM=("${STACK[@]}" --profile observability)
prom_start=$SECONDS
"${PROM[@]}" build prometheus >"$WORK/build-prometheus.log" 2>&1 || {
  tail -n 20 "$WORK/build-prometheus.log" >&2
  die "the observability profile's Prometheus image could not be built (the end of its build log above)"
}
say "observability: ioasid-fabric-prometheus:dev built in $((SECONDS - prom_start)) s ($(size ioasid-fabric-prometheus:dev), $(docker run --rm --network none --entrypoint prometheus ioasid-fabric-prometheus:dev --version 2>&1 | head -n1))"
"${PROM[@]}" up -d --no-build --no-deps prometheus >>"$WORK/up.log" 2>&1 || { tail -n 20 "$WORK/up.log" >&2; die "the Prometheus container did not start"; }
# Bounded by the clock: its scrape interval is 5 s, so the five targets are up within seconds. A
# curl that cannot connect yet (Prometheus still starting) is a round without an answer, not an
# error (`|| true`: under set -e and pipefail it ended the run, exit 7).
prom_deadline=$((SECONDS + 120))
up_targets=0
while [ "$SECONDS" -lt "$prom_deadline" ]; do
  up_targets="$(curl -fsS "http://127.0.0.1:$IOASID_PORT_PROMETHEUS/api/v1/targets" 2>/dev/null |
    node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{try{const j=JSON.parse(s);console.log(j.data.activeTargets.filter(t=>t.health==="up").map(t=>t.labels.service).sort().join(","))}catch{console.log("")}})' || true)"
  [ "$up_targets" = "ioasid-core,iommu,kvm,vdcm,vfio" ] && break
  sleep 1
done
[ "$up_targets" = "ioasid-core,iommu,kvm,vdcm,vfio" ] || {
  "${PROM[@]}" logs --no-color --tail 20 prometheus >&2
  die "Prometheus did not scrape all five services within 120 s (up: ${up_targets:-none})"
}
# What the tests above did is in what it scraped: the FREEs delivered to the tiers, acknowledged.
acked="$(curl -fsS --get "http://127.0.0.1:$IOASID_PORT_PROMETHEUS/api/v1/query" --data-urlencode 'query=sum(ioasid_deliveries_total{outcome="acked"})' 2>/dev/null |
  node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{try{console.log(JSON.parse(s).data.result[0].value[1])}catch{console.log("none")}})' || true)"
case "$acked" in '' | none | 0) die "Prometheus scraped no acknowledged delivery from the core (got: $acked)" ;; esac
console="$(curl -fsS -o /dev/null -w '%{http_code}' "http://127.0.0.1:$IOASID_PORT_PROMETHEUS/consoles/ioasid.html" 2>/dev/null || true)"
[ "$console" = 200 ] || die "the ioasid console page answered HTTP ${console:-nothing}"
say "observability: Prometheus on 127.0.0.1:$IOASID_PORT_PROMETHEUS scrapes all five services ($up_targets), $acked acknowledged deliveries scraped from the core, console page HTTP 200"
"${PROM[@]}" rm -s -f prometheus >>"$WORK/stop.log" 2>&1 || true
fi

since="$(date +%s)"
say "end-to-end tests with the testkit's NATS in containers (IOASID_TESTKIT_DOCKER=1): test/e2e/lifecycle.test.ts, test/e2e/crashed-vmm.test.ts"
IOASID_TESTKIT_DOCKER=1 npx vitest run --project integration test/e2e/lifecycle.test.ts test/e2e/crashed-vmm.test.ts ||
  die "the end-to-end tests failed with NATS in containers"
created="$(docker events --since "$since" --until "$(date +%s)" --filter type=container --filter event=start --filter image=ioasid-fabric-nats:dev --format '{{.ID}}' | sort -u | wc -l)"
say "end-to-end tests passed with NATS in $created container(s) started through testcontainers"

# --- 6. the single-server stack goes (the cluster leg takes the same ports) --------------------------
stack_down || die "not every service of the stack stopped gracefully (exit codes above)"

# --- 7. the cluster profile: three nats-servers, every stream with three replicas --------------------
ACTIVE=("${CLUSTER[@]}")
ACTIVE_SERVICES=("${CLUSTER_SERVICES[@]}")
ACTIVE_NAME="cluster stack"
ACTIVE_VOLUMES="the nats-data, nats-2-data and nats-3-data volumes"
# Credentials of its own, made by its credentials step (the same users and permissions on each node).
export IOASID_COMPOSE_CREDENTIALS="$WORK/cluster-credentials"
for p in "$IOASID_PORT_NATS" "$IOASID_PORT_NATS_2" "$IOASID_PORT_NATS_3" "$IOASID_PORT_NATS_MONITOR" "$IOASID_PORT_NATS_2_MONITOR" \
  "$IOASID_PORT_NATS_3_MONITOR" "$IOASID_PORT_NATS_ROUTE" "$IOASID_PORT_NATS_2_ROUTE" "$IOASID_PORT_NATS_3_ROUTE" \
  "$IOASID_PORT_CORE" "$IOASID_PORT_IOMMU" "$IOASID_PORT_VFIO" "$IOASID_PORT_KVM" "$IOASID_PORT_VDCM"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
    die "port $p of 127.0.0.1 is in use: stop what listens there, or choose other ports (IOASID_PORT_NATS_2, IOASID_PORT_NATS_ROUTE, … see the top of $0)"
  fi
done
up_start=$SECONDS
STACK_UP=1
"${CLUSTER[@]}" up -d --no-build >"$WORK/up-cluster.log" 2>&1 || { cat "$WORK/up-cluster.log" >&2; die "\`${CLUSTER[*]} up -d\` failed"; }
wait_healthy
say "cluster stack healthy in $((SECONDS - up_start)) s: nats-1 127.0.0.1:$IOASID_PORT_NATS, nats-2 :$IOASID_PORT_NATS_2, nats-3 :$IOASID_PORT_NATS_3 (routes :$IOASID_PORT_NATS_ROUTE, :$IOASID_PORT_NATS_2_ROUTE, :$IOASID_PORT_NATS_3_ROUTE; monitoring :$IOASID_PORT_NATS_MONITOR, :$IOASID_PORT_NATS_2_MONITOR, :$IOASID_PORT_NATS_3_MONITOR), the five services on all three"
say "NATS JetStream: nats-1 $(jsz "$IOASID_PORT_NATS_MONITOR"); nats-2 $(jsz "$IOASID_PORT_NATS_2_MONITOR"); nats-3 $(jsz "$IOASID_PORT_NATS_3_MONITOR")"
cluster_json="$(node -e 'console.log(JSON.stringify(process.argv.slice(1)))' "${CLUSTER[@]}")"
say "test/containers/compose-cluster.test.ts: ioasidctl against the cluster stack (3 replicas per stream, both scenarios, a nats container killed mid-run and started again)"
IOASID_CT_CLUSTER=1 IOASID_CT_COMPOSE="$cluster_json" npx vitest run --config vitest.containers.config.ts --reporter=verbose ||
  die "test/containers/compose-cluster.test.ts failed (output above; the stack's logs: \`${CLUSTER[*]} logs\` while it runs)"
stack_down || die "not every service of the cluster stack stopped gracefully (exit codes above)"

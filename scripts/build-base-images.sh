#!/usr/bin/env bash
# Builds, from Debian packages on this machine, the base images deploy/Dockerfile and
# deploy/nats.Dockerfile name, for a Docker engine that cannot pull them (no image registry):
#
#   debian:bookworm-slim    debootstrap --variant=minbase of Debian bookworm from DEBIAN_MIRROR
#                           (default http://deb.debian.org/debian), apt lists and caches emptied,
#                           apt sources set to bookworm, bookworm-updates and bookworm-security,
#                           imported with `docker import` (CMD bash)
#   node:20-bookworm-slim   that image plus this machine's Node.js 20 binary and npm
#                           (deploy/base/node.Dockerfile; a `node` user, uid 1000, as the official one)
#
# They are local stand-ins with the official names, so the Dockerfiles stay the ones a user with a
# registry builds; each carries a label saying what it is. An image that already exists is kept
# unless --force. Needs root (debootstrap), debootstrap, and DOCKER_HOST (or the default socket).
set -euo pipefail
cd "$(dirname "$0")/.."

force=0
[ "${1:-}" = "--force" ] && force=1
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
say() { echo "base-images: $*"; }
have() { docker image inspect "$1" >/dev/null 2>&1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/ioasid-base-images.XXXXXX")"
cleanup() { rm -rf "$work"; }
trap cleanup EXIT

if [ "$force" = 1 ] || ! have debian:bookworm-slim; then
  command -v debootstrap >/dev/null 2>&1 || { echo "base-images: debootstrap is missing: apt-get install -y debootstrap" >&2; exit 1; }
  say "debootstrap --variant=minbase bookworm from $mirror"
  start=$SECONDS
  if ! debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1; then
    tail -n 20 "$work/debootstrap.log" >&2
    echo "base-images: debootstrap failed (log above)" >&2
    exit 1
  fi
  root="$work/rootfs"
  rm -f "$root/etc/apt/sources.list"
  cat >"$root/etc/apt/sources.list.d/debian.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb "$root"/var/log/* "$root"/tmp/*
  : >"$root/etc/hostname"
  : >"$root/etc/resolv.conf"
  tar --numeric-owner -C "$root" -c . | docker import \
    --change 'CMD ["bash"]' \
    --change "LABEL org.opencontainers.image.description=\"Local stand-in for debian:bookworm-slim: debootstrap --variant=minbase bookworm (scripts/build-base-images.sh)\"" \
    - debian:bookworm-slim >/dev/null
  say "debian:bookworm-slim built ($(docker image inspect -f '{{.Size}}' debian:bookworm-slim | awk '{printf "%d MB", $1/1e6}'), $((SECONDS - start)) s)"
else
  say "debian:bookworm-slim present (kept; --force rebuilds)"
fi

if [ "$force" = 1 ] || ! have node:20-bookworm-slim; then
  node_bin="$(readlink -f "$(command -v node)")"
  npm_dir="$(npm root -g 2>/dev/null)/npm"
  version="$("$node_bin" --version)"
  case "$version" in
    v20.*) ;;
    *) echo "base-images: node:20-bookworm-slim needs Node.js 20 on this machine; $node_bin is $version" >&2; exit 1 ;;
  esac
  [ -f "$npm_dir/bin/npm-cli.js" ] || { echo "base-images: npm not found at $npm_dir" >&2; exit 1; }
  start=$SECONDS
  mkdir -p "$work/node"
  cp "$node_bin" "$work/node/node"
  cp -a "$npm_dir" "$work/node/npm"
  cp deploy/base/node.Dockerfile "$work/node/Dockerfile"
  DOCKER_BUILDKIT=0 docker build --quiet --network host \
    --label "org.opencontainers.image.description=Local stand-in for node:20-bookworm-slim: debian:bookworm-slim (debootstrap) + this machine's Node.js $version and npm (scripts/build-base-images.sh)" \
    -t node:20-bookworm-slim "$work/node" >/dev/null
  say "node:20-bookworm-slim built (Node.js $version, npm $(docker run --rm --network none node:20-bookworm-slim npm --version 2>/dev/null), $((SECONDS - start)) s)"
else
  say "node:20-bookworm-slim present (kept; --force rebuilds)"
fi

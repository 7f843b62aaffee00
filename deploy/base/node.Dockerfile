# Local stand-in for the official node:20-bookworm-slim image, for machines without an image
# registry (scripts/build-base-images.sh builds it; with a registry, use the official image).
# It is debian:bookworm-slim (itself a debootstrap of Debian bookworm, see the script) plus this
# machine's own Node.js 20 binary and npm, copied in; like the official image, it has a `node`
# user (uid 1000) and runs `node` by default. It has no yarn and no docker-entrypoint.sh.
FROM debian:bookworm-slim
COPY node /usr/local/bin/node
COPY npm /usr/local/lib/node_modules/npm
RUN groupadd --gid 1000 node \
 && useradd --uid 1000 --gid node --shell /bin/bash --create-home node \
 && ln -s ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm \
 && ln -s ../lib/node_modules/npm/bin/npx-cli.js /usr/local/bin/npx \
 && node --version && npm --version
CMD ["node"]

#!/usr/bin/env node
// The compose init step (DESIGN §11): `node packages/security/dist/init-credentials.js DIR`
// writes a stack's credentials into DIR once — a directory per role instance, the operator's, the
// VMMs', the CA, and DIR/nats/nats-server.conf — and keeps them when they are there already (a
// restarted container must find the credentials its peers know). Options by environment:
//   IOASID_CREDENTIALS_UID / _GID   owner of each service's directory (the image's `node` user, 1000)
//   IOASID_CREDENTIALS_FORCE=1     make new ones even when DIR has some
import { existsSync } from "node:fs";
import { join } from "node:path";
import { chownTree, DEFAULT_MEMBERS, makePublic, memberDir, VMM_IDENTITY, writeStackCredentials, type StackMember } from "./stack-credentials.js";

/** The compose stack's role instances (docker-compose.yml sets the services' default instances). */
const COMPOSE_MEMBERS: readonly StackMember[] = DEFAULT_MEMBERS;

const root = process.argv[2];
if (root === undefined || root === "") {
  process.stderr.write("usage: init-credentials.js DIR\n");
  process.exit(2);
}
const config = join(root, "nats", "nats-server.conf");
if (existsSync(config) && process.env["IOASID_CREDENTIALS_FORCE"] !== "1") {
  process.stdout.write(`credentials kept: ${root} has them already (IOASID_CREDENTIALS_FORCE=1 makes new ones)\n`);
  process.exit(0);
}
const made = await writeStackCredentials({
  root,
  members: COMPOSE_MEMBERS,
  config: { file: config, lines: ["port: 4222", "http_port: 8222", "jetstream { store_dir: /data }"] },
});
makePublic(made.config);
const uid = Number(process.env["IOASID_CREDENTIALS_UID"] ?? 1000);
const gid = Number(process.env["IOASID_CREDENTIALS_GID"] ?? 1000);
if (process.getuid?.() === 0) {
  // The services run as the image's user: their own directory is theirs; the operator's stays root's.
  for (const m of [...COMPOSE_MEMBERS, VMM_IDENTITY]) chownTree(memberDir(root, m), uid, gid);
}
process.stdout.write(`credentials made in ${root}: ${[...made.members.keys()].join(", ")}, operator, vmm; nats config ${made.config}\n`);

import { chmodSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { createUser, fromSeed } from "@nats-io/nkeys";
import { nkeyAuthenticator, type Authenticator } from "@nats-io/transport-node";
import { inboxPrefix, natsPermissions, NATS_ROLES, type NatsIdentity, type NatsPermissions, type NatsRole } from "./nats-permissions.js";

/** The file of a role instance's NATS credential inside its credentials directory. */
export const NATS_CREDENTIAL_FILE = "nats.json";

/** A role instance's NATS credential: its nkey seed (secret) and who it is. */
export interface NatsCredential extends NatsIdentity {
  /** The user's nkey seed (`SU…`): the secret; the server knows only the public key. */
  readonly seed: string;
  /** The user's public nkey (`U…`), what the server's config names. */
  readonly publicKey: string;
}

/** One user of the server's `authorization` block. */
export type NatsUserEntry =
  | { readonly nkey: string; readonly permissions: NatsPermissions | undefined; readonly comment: string }
  | { readonly user: string; readonly password: string; readonly permissions: NatsPermissions | undefined; readonly comment: string };

/** A new nkey user for a role instance. */
export function createNatsCredential(identity: NatsIdentity): NatsCredential {
  checkIdentity(identity);
  const kp = createUser();
  return { role: identity.role, instance: identity.instance, seed: new TextDecoder().decode(kp.getSeed()), publicKey: kp.getPublicKey() };
}

/** The server-side entry of a credential: its public key and its role's permissions. */
export function natsUserEntry(prefix: string, credential: NatsCredential): NatsUserEntry {
  return { nkey: credential.publicKey, permissions: natsPermissions(prefix, credential), comment: `${credential.role}/${credential.instance}` };
}

/**
 * The nats-server `authorization` block for these users. Nobody connects without a credential (no
 * `no_auth_user`); each user gets its role's permissions, and a violation is refused and logged by
 * the server ("Permissions Violation for Publish to …").
 */
export function renderAuthorization(users: readonly NatsUserEntry[]): string {
  const lines = users.map((u) => {
    const entry: Record<string, unknown> = "nkey" in u ? { nkey: u.nkey } : { user: u.user, password: u.password };
    if (u.permissions !== undefined) entry["permissions"] = permissionsBlock(u.permissions);
    return `    # ${u.comment.replace(/[\r\n]/g, " ")}\n    ${JSON.stringify(entry)}`;
  });
  return `authorization {\n  users = [\n${lines.join(",\n")}\n  ]\n}\n`;
}

function permissionsBlock(p: NatsPermissions): Record<string, unknown> {
  const side = (s: { allow: readonly string[]; deny: readonly string[] }) => ({ allow: s.allow, ...(s.deny.length === 0 ? {} : { deny: s.deny }) });
  return { publish: side(p.publish), subscribe: side(p.subscribe), allow_responses: p.allowResponses };
}

/** Writes the credential into a role instance's credentials directory (mode 0600). */
export function writeNatsCredential(dir: string, credential: NatsCredential): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const file = join(dir, NATS_CREDENTIAL_FILE);
  writeFileSync(file, JSON.stringify({ role: credential.role, instance: credential.instance, seed: credential.seed }) + "\n", { mode: 0o600 });
  chmodSync(file, 0o600);
}

/**
 * Reads the credential of a credentials directory.
 * @throws Error naming the file and what is wrong with it
 */
export function readNatsCredential(dir: string): NatsCredential {
  const file = join(dir, NATS_CREDENTIAL_FILE);
  let parsed: unknown;
  try {
    parsed = JSON.parse(readFileSync(file, "utf8"));
  } catch (err) {
    throw new Error(`cannot read the NATS credential ${file}: ${(err as Error).message}`, { cause: err });
  }
  const o = parsed as Record<string, unknown>;
  if (typeof o["seed"] !== "string" || typeof o["role"] !== "string" || typeof o["instance"] !== "string")
    throw new Error(`${file} is not a NATS credential (want {"role","instance","seed"})`);
  const identity = { role: o["role"] as NatsRole, instance: o["instance"] };
  checkIdentity(identity);
  let publicKey: string;
  try {
    publicKey = fromSeed(new TextEncoder().encode(o["seed"])).getPublicKey();
  } catch (err) {
    throw new Error(`${file}: the seed is not a NATS user nkey seed`, { cause: err });
  }
  return { ...identity, seed: o["seed"], publicKey };
}

/**
 * What a connection made with this credential needs: the nkey authenticator, and its own inbox
 * prefix (the only inbox its user may subscribe to).
 */
export function natsConnectOptions(credential: NatsCredential): { authenticator: Authenticator; inboxPrefix: string } {
  return { authenticator: nkeyAuthenticator(new TextEncoder().encode(credential.seed)), inboxPrefix: inboxPrefix(credential) };
}

const INSTANCE = /^[A-Za-z0-9._:@-]{1,128}$/;

function checkIdentity(identity: { role: string; instance: string }): void {
  if (!(NATS_ROLES as readonly string[]).includes(identity.role)) throw new Error(`unknown role "${identity.role}" (want one of ${NATS_ROLES.join(", ")})`);
  if (!INSTANCE.test(identity.instance)) throw new Error(`instance "${identity.instance.slice(0, 64)}" is not 1..128 of letters, digits and ._:@-`);
}

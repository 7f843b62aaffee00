import { chmodSync, chownSync, mkdirSync, readdirSync, rmSync, statSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { createNatsCredential, natsUserEntry, renderAuthorization, writeNatsCredential, type NatsUserEntry } from "./nats-credentials.js";
import type { NatsRole } from "./nats-permissions.js";
import { createStackCa, issueCertificate, writeInstanceCredentials, writeStackCa } from "./pki.js";

/** A role instance of a stack that gets a credential: its NATS user and its certificate. */
export interface StackMember {
  readonly role: Exclude<NatsRole, "operator">;
  readonly instance: string;
}

/**
 * The role instances of a stack as the services start by default (each service's config default,
 * and the variable that changes it): what `ioasidctl up`, the compose step and the testkit make
 * credentials for.
 */
export const DEFAULT_MEMBERS = [
  { role: "core", instance: "core", variable: undefined },
  { role: "iommu", instance: "dmar0", variable: "IOMMU_INSTANCE" },
  { role: "vfio", instance: "vfio-1", variable: "VFIO_INSTANCE" },
  { role: "kvm", instance: "kvm0", variable: undefined },
  { role: "vdcm", instance: "vdcm0", variable: "VDCM_INSTANCE" },
] as const satisfies ReadonlyArray<StackMember & { readonly variable: string | undefined }>;

/** A role's default instance (see {@link DEFAULT_MEMBERS}). */
export function defaultMember(role: StackMember["role"]): (typeof DEFAULT_MEMBERS)[number] {
  return DEFAULT_MEMBERS.find((m) => m.role === role)!;
}

/** The operator's identity in a stack's credentials. */
export const OPERATOR_IDENTITY = { role: "operator", instance: "operator" } as const;
/** The identity VMM processes (`ioasidctl vm create`) present to VFIO. */
export const VMM_IDENTITY = { role: "vmm", instance: "vmm" } as const;

/** Where {@link writeStackCredentials} put everything. */
export interface StackCredentials {
  /** The nats-server configuration written. */
  readonly config: string;
  /** Each member's credentials directory, by `<role>.<instance>`. */
  readonly members: ReadonlyMap<string, string>;
  /** The operator's credentials directory (NATS user without limits, certificate). */
  readonly operator: string;
  /** The VMMs' credentials directory (a certificate only: VMMs reach VFIO, not NATS). */
  readonly vmm: string;
}

/** The directory name of a member's credentials under the root. */
export function memberDir(root: string, m: { readonly role: string; readonly instance: string }): string {
  return join(root, `${m.role}.${m.instance}`);
}

/**
 * Makes a credential per stack member (and the operator's and the VMMs') under
 * `<root>/<role>.<instance>/` — its NATS user (`nats.json`) and its certificate from a stack-local
 * CA (`ca.pem`, `cert.pem`, `key.pem`; the CA's key in `<root>/ca/`, given to no service) — and the
 * nats-server configuration that knows the users' public keys and their permissions (DESIGN §11:
 * `ioasidctl up` and the compose init step generate what is needed).
 * @param options.root where the credentials go (emptied first; 0700, files 0600)
 * @param options.config the nats-server configuration file to write, and its lines before the
 *   `authorization` block (listen address, JetStream store); it names public keys only
 */
export async function writeStackCredentials(options: {
  readonly root: string;
  readonly members: readonly StackMember[];
  readonly config: { readonly file: string; readonly lines: readonly string[] };
  readonly prefix?: string;
}): Promise<StackCredentials> {
  const { root } = options;
  const prefix = options.prefix ?? "ioasid.v1";
  // Emptied, not removed: in a container the root is a mount point.
  mkdirSync(root, { recursive: true, mode: 0o700 });
  for (const name of readdirSync(root)) rmSync(join(root, name), { recursive: true, force: true });
  chmodSync(root, 0o700);
  const ca = await createStackCa();
  writeStackCa(root, ca);
  const certify = async (credDir: string, identity: { role: NatsRole | "vmm"; instance: string }) =>
    writeInstanceCredentials(credDir, ca.certPem, await issueCertificate(ca, identity));
  const members = new Map<string, string>();
  const entries: NatsUserEntry[] = [];
  for (const m of options.members) {
    const credential = createNatsCredential(m);
    const dir = memberDir(root, m);
    writeNatsCredential(dir, credential);
    await certify(dir, m);
    members.set(`${m.role}.${m.instance}`, dir);
    entries.push(natsUserEntry(prefix, credential));
  }
  const op = createNatsCredential(OPERATOR_IDENTITY);
  const operator = memberDir(root, OPERATOR_IDENTITY);
  writeNatsCredential(operator, op);
  await certify(operator, OPERATOR_IDENTITY);
  entries.push({ ...natsUserEntry(prefix, op), comment: "operator: no limits (ioasidctl, stream management)" });
  const vmm = memberDir(root, VMM_IDENTITY);
  await certify(vmm, VMM_IDENTITY);
  const config = options.config.file;
  mkdirSync(dirname(config), { recursive: true });
  writeFileSync(
    config,
    [
      "# Written by ioasid-fabric: a user per role instance with its role's permissions (DESIGN §11).",
      ...options.config.lines,
      renderAuthorization(entries),
    ].join("\n"),
    { mode: 0o600 },
  );
  return { config, members, operator, vmm };
}

/** Gives a directory tree to a user (a container's service user), keeping its modes. */
export function chownTree(path: string, uid: number, gid: number): void {
  chownSync(path, uid, gid);
  if (!statSync(path).isDirectory()) return;
  for (const name of readdirSync(path)) chownTree(join(path, name), uid, gid);
}

/** Makes a file and its directory readable by all (the nats-server config names public keys only). */
export function makePublic(file: string): void {
  chmodSync(dirname(file), 0o755);
  chmodSync(file, 0o644);
}

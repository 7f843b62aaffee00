import { X509Certificate, createPrivateKey, webcrypto } from "node:crypto";
import { chmodSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type * as X509 from "@peculiar/x509";
import { assertRoleIdentity, formatIdentity, identityFromSubjectAltName, toIdentityUri, type RoleIdentity } from "./identity.js";

// The stack-local PKI of DESIGN §11: one CA per stack, one certificate per role instance.
//
// @peculiar/x509 2.x resolves its algorithm providers through tsyringe, which needs the Reflect
// metadata polyfill loaded first; 2.x no longer imports `reflect-metadata` itself (1.x did). Both are
// loaded on first use only, so a service that merely reads its credentials never pays for them (nor
// gets a global Reflect patched).

let library: Promise<typeof X509> | undefined;
async function x509(): Promise<typeof X509> {
  library ??= (async () => {
    await import("reflect-metadata");
    return import("@peculiar/x509");
  })();
  return library;
}

/** ECDSA P-256 with SHA-256: what every TLS stack of the field accepts, small and fast to verify. */
const ALGORITHM = { name: "ECDSA", namedCurve: "P-256", hash: "SHA-256" } as const;

const DAY_MS = 86_400_000;
/**
 * Validity of a stack CA. Ten years: it lives only on the host (or compose volume) that made it,
 * signs only that stack's role instances, and its key is never given to a service; a short life
 * would only make long-running stacks stop at an arbitrary date, while a stack that wants a new CA
 * just generates new credentials (`up` does).
 */
export const CA_VALIDITY_DAYS = 3650;
/** Validity of a role instance's certificate: one year; `up` and the compose init step issue new ones. */
export const CERT_VALIDITY_DAYS = 365;
/** notBefore is set this far back: the clocks of a compose network's containers need not agree to the second. */
const BACKDATE_MS = 5 * 60_000;

/** File names of an instance credentials directory (what one role instance is given, and nothing else). */
export const CREDENTIAL_FILES = { ca: "ca.pem", cert: "cert.pem", key: "key.pem" } as const;
/** File names of the stack CA, in `<stack credentials root>/ca/`; the key is never given to a service. */
export const CA_FILES = { dir: "ca", cert: "ca.pem", key: "ca.key" } as const;

/** A stack CA: its certificate and its private key (PKCS#8), both PEM. */
export interface StackCa {
  readonly certPem: string;
  readonly keyPem: string;
}

/** A role instance's certificate (signed by the stack CA) and private key (PKCS#8), both PEM. */
export interface IssuedCertificate {
  readonly identity: RoleIdentity;
  readonly certPem: string;
  readonly keyPem: string;
}

/** Options of {@link createStackCa}. */
export interface CreateStackCaOptions {
  /** The CA's CN. @default "ioasid-fabric stack CA" */
  readonly commonName?: string;
  /** @default {@link CA_VALIDITY_DAYS} */
  readonly validityDays?: number;
  /** @default now */
  readonly now?: Date;
}

/**
 * Creates a stack CA: a self-signed ECDSA P-256 certificate allowed to sign end-entity
 * certificates only (path length 0).
 *
 * @example
 * const ca = await createStackCa();
 * const core = await issueCertificate(ca, { role: "core", instance: "core" });
 */
export async function createStackCa(options: CreateStackCaOptions = {}): Promise<StackCa> {
  const lib = await x509();
  const keys = (await webcrypto.subtle.generateKey(ALGORITHM, true, ["sign", "verify"])) as webcrypto.CryptoKeyPair;
  const now = options.now ?? new Date();
  const cert = await lib.X509CertificateGenerator.createSelfSigned({
    serialNumber: serialNumber(),
    name: `CN=${options.commonName ?? "ioasid-fabric stack CA"}`,
    notBefore: new Date(now.getTime() - BACKDATE_MS),
    notAfter: new Date(now.getTime() + (options.validityDays ?? CA_VALIDITY_DAYS) * DAY_MS),
    keys,
    signingAlgorithm: ALGORITHM,
    extensions: [
      new lib.BasicConstraintsExtension(true, 0, true),
      new lib.KeyUsagesExtension(lib.KeyUsageFlags.keyCertSign | lib.KeyUsageFlags.cRLSign, true),
      await lib.SubjectKeyIdentifierExtension.create(keys.publicKey),
    ],
  });
  return { certPem: cert.toString("pem"), keyPem: await pkcs8Pem(lib, keys.privateKey) };
}

/** Options of {@link issueCertificate}. */
export interface IssueCertificateOptions {
  /**
   * Names the certificate also answers to besides `localhost` and `127.0.0.1` (a compose service
   * name, a host's address): DNS names, or IP literals.
   */
  readonly hosts?: readonly string[];
  /** @default {@link CERT_VALIDITY_DAYS} */
  readonly validityDays?: number;
  /** @default now */
  readonly now?: Date;
}

/**
 * Issues a role instance's certificate, signed by the stack CA: a new ECDSA P-256 key; CN
 * `<role>/<instance>`; SAN the identity URI `spiffe://ioasid-fabric/<role>/<instance>` plus DNS
 * `localhost` and IP `127.0.0.1` (and `hosts`); EKU serverAuth + clientAuth, so the same
 * certificate serves the instance's gRPC server and dials its peers.
 * @throws Error when the identity is not well formed.
 */
export async function issueCertificate(ca: StackCa, identity: RoleIdentity, options: IssueCertificateOptions = {}): Promise<IssuedCertificate> {
  assertRoleIdentity(identity);
  const lib = await x509();
  const caCert = new lib.X509Certificate(ca.certPem);
  const caKey = await webcrypto.subtle.importKey("pkcs8", lib.PemConverter.decodeFirst(ca.keyPem), ALGORITHM, false, ["sign"]);
  const keys = (await webcrypto.subtle.generateKey(ALGORITHM, true, ["sign", "verify"])) as webcrypto.CryptoKeyPair;
  const now = options.now ?? new Date();
  const names: X509.JsonGeneralName[] = [
    { type: "url", value: toIdentityUri(identity) },
    { type: "dns", value: "localhost" },
    { type: "ip", value: "127.0.0.1" },
  ];
  for (const host of options.hosts ?? []) names.push(isIpLiteral(host) ? { type: "ip", value: host } : { type: "dns", value: host });
  const cert = await lib.X509CertificateGenerator.create({
    serialNumber: serialNumber(),
    subject: `CN=${formatIdentity(identity)}`,
    issuer: caCert.subject,
    notBefore: new Date(now.getTime() - BACKDATE_MS),
    notAfter: new Date(now.getTime() + (options.validityDays ?? CERT_VALIDITY_DAYS) * DAY_MS),
    publicKey: keys.publicKey,
    signingKey: caKey,
    signingAlgorithm: ALGORITHM,
    extensions: [
      new lib.BasicConstraintsExtension(false, undefined, true),
      new lib.KeyUsagesExtension(lib.KeyUsageFlags.digitalSignature, true),
      new lib.ExtendedKeyUsageExtension([lib.ExtendedKeyUsage.serverAuth, lib.ExtendedKeyUsage.clientAuth]),
      new lib.SubjectAlternativeNameExtension(names),
      await lib.SubjectKeyIdentifierExtension.create(keys.publicKey),
      await lib.AuthorityKeyIdentifierExtension.create(caCert.publicKey),
    ],
  });
  return { identity, certPem: cert.toString("pem"), keyPem: await pkcs8Pem(lib, keys.privateKey) };
}

/**
 * Writes the stack CA to `<root>/ca/ca.pem` and `<root>/ca/ca.key` (the key mode 0600, the
 * directory 0700). The CA key stays here: it is never part of an instance directory.
 * @returns the CA directory.
 */
export function writeStackCa(root: string, ca: StackCa): string {
  const dir = join(root, CA_FILES.dir);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  writeFileSync(join(dir, CA_FILES.cert), ca.certPem, { mode: 0o644 });
  writeSecret(join(dir, CA_FILES.key), ca.keyPem);
  return dir;
}

/** Reads the stack CA written by {@link writeStackCa}. @throws Error when a file is missing. */
export function readStackCa(root: string): StackCa {
  const dir = join(root, CA_FILES.dir);
  return { certPem: readFileSync(join(dir, CA_FILES.cert), "utf8"), keyPem: readFileSync(join(dir, CA_FILES.key), "utf8") };
}

/**
 * Writes one role instance's credentials directory: `ca.pem` (the stack CA's certificate),
 * `cert.pem`, `key.pem` (mode 0600). The directory (mode 0700) is what the instance is given
 * through `IOASID_CREDENTIALS_DIR`; other files there (the integrator's `nats.nk`) are left alone.
 */
export function writeInstanceCredentials(dir: string, caCertPem: string, issued: IssuedCertificate): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  writeFileSync(join(dir, CREDENTIAL_FILES.ca), caCertPem, { mode: 0o644 });
  writeFileSync(join(dir, CREDENTIAL_FILES.cert), issued.certPem, { mode: 0o644 });
  writeSecret(join(dir, CREDENTIAL_FILES.key), issued.keyPem);
}

/** A role instance's credentials as read back from its directory, checked. */
export interface InstanceCredentials {
  /** The directory they were read from. */
  readonly dir: string;
  /** Who the certificate speaks for (from its identity URI). */
  readonly identity: RoleIdentity;
  /** The stack CA's certificate, PEM: whom this instance trusts. */
  readonly ca: Buffer;
  /** The instance's certificate, PEM. */
  readonly cert: Buffer;
  /** The instance's private key, PKCS#8 PEM. */
  readonly key: Buffer;
}

/**
 * Reads and checks a role instance's credentials directory (node:crypto only: no certificate
 * library is loaded): the certificate is signed by the directory's CA, names exactly one identity,
 * is within its validity, and matches the key.
 * @throws Error saying which file is wrong and how.
 */
export function readInstanceCredentials(dir: string, now: Date = new Date()): InstanceCredentials {
  const read = (name: string): Buffer => {
    try {
      return readFileSync(join(dir, name));
    } catch (err) {
      throw new Error(`credentials in ${dir}: cannot read ${name} (${(err as NodeJS.ErrnoException).code ?? String(err)})`, { cause: err });
    }
  };
  const ca = read(CREDENTIAL_FILES.ca);
  const cert = read(CREDENTIAL_FILES.cert);
  const key = read(CREDENTIAL_FILES.key);
  const parse = (pem: Buffer, name: string): X509Certificate => {
    try {
      return new X509Certificate(pem);
    } catch (err) {
      throw new Error(`credentials in ${dir}: ${name} is not a PEM certificate`, { cause: err });
    }
  };
  const caCert = parse(ca, CREDENTIAL_FILES.ca);
  const leaf = parse(cert, CREDENTIAL_FILES.cert);
  const problem = chainProblem(leaf, caCert, now);
  if (problem !== undefined) throw new Error(`credentials in ${dir}: ${CREDENTIAL_FILES.cert}: ${problem}`);
  let privateKey;
  try {
    privateKey = createPrivateKey(key);
  } catch (err) {
    throw new Error(`credentials in ${dir}: ${CREDENTIAL_FILES.key} is not a PEM private key`, { cause: err });
  }
  if (!leaf.checkPrivateKey(privateKey)) throw new Error(`credentials in ${dir}: ${CREDENTIAL_FILES.key} is not the key of ${CREDENTIAL_FILES.cert}`);
  const identity = identityFromSubjectAltName(leaf.subjectAltName);
  if (identity === undefined) {
    throw new Error(`credentials in ${dir}: ${CREDENTIAL_FILES.cert} names no role identity (one URI SAN spiffe://ioasid-fabric/<role>/<instance>)`);
  }
  return { dir, identity, ca, cert, key };
}

/**
 * Why `cert` is not a valid certificate of the CA `ca` at `now`, or undefined when it is: issued by
 * it (names and signature) and within both validity periods.
 */
export function chainProblem(cert: X509Certificate, ca: X509Certificate, now: Date = new Date()): string | undefined {
  if (!cert.checkIssued(ca) || !cert.verify(ca.publicKey)) return `not signed by the CA (${ca.subject.replace(/\n/g, ", ")})`;
  for (const [what, c] of [
    ["the certificate", cert],
    ["the CA certificate", ca],
  ] as const) {
    if (now < new Date(c.validFrom)) return `${what} is not valid before ${c.validFrom}`;
    if (now > new Date(c.validTo)) return `${what} expired at ${c.validTo}`;
  }
  return undefined;
}

async function pkcs8Pem(lib: typeof X509, key: webcrypto.CryptoKey): Promise<string> {
  return lib.PemConverter.encode(await webcrypto.subtle.exportKey("pkcs8", key), "PRIVATE KEY");
}

function writeSecret(path: string, content: string): void {
  writeFileSync(path, content, { mode: 0o600 });
  // The mode of writeFileSync applies only to a file it creates: an existing key file keeps its own.
  chmodSync(path, 0o600);
}

/** A positive 128-bit serial, hex (RFC 5280 §4.1.2.2: positive, unique per CA, at most 20 octets). */
function serialNumber(): string {
  const bytes = webcrypto.getRandomValues(new Uint8Array(16));
  bytes[0] = bytes[0]! & 0x7f;
  return Buffer.from(bytes).toString("hex");
}

function isIpLiteral(host: string): boolean {
  return /^\d{1,3}(\.\d{1,3}){3}$/.test(host) || host.includes(":");
}

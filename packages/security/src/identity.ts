/**
 * The roles of a stack that hold a credential (DESIGN §1, §11): the services, the operator (the
 * CLI's audited actions) and the VMMs (which reach only VFIO). Closed set; a certificate naming
 * anything else names nobody.
 */
export const Role = {
  CORE: "core",
  IOMMU: "iommu",
  KVM: "kvm",
  VDCM: "vdcm",
  VFIO: "vfio",
  OPERATOR: "operator",
  VMM: "vmm",
} as const;
export type Role = (typeof Role)[keyof typeof Role];

/** Every {@link Role}, in a stable order. */
export const ROLES: readonly Role[] = Object.freeze(Object.values(Role));

/**
 * Who a credential speaks for: one instance of one role (`kvm`/`kvm0`, `iommu`/`dmar0`). DESIGN §11:
 * "a certificate per role instance".
 */
export interface RoleIdentity {
  readonly role: Role;
  readonly instance: string;
}

/** An instance name: the same alphabet as a core holder's or subscriber's instance (core.proto `Holder`). */
export const INSTANCE_PATTERN = /^[A-Za-z0-9._:@-]{1,128}$/;

/** The SPIFFE-style trust domain of every identity URI: `spiffe://ioasid-fabric/<role>/<instance>`. */
export const TRUST_DOMAIN = "ioasid-fabric";

const URI_PREFIX = `spiffe://${TRUST_DOMAIN}/`;

/** Guard: is `value` one of the {@link ROLES}? */
export function isRole(value: unknown): value is Role {
  return typeof value === "string" && (ROLES as readonly string[]).includes(value);
}

/** Guard: is `value` a well-formed {@link RoleIdentity}? */
export function isRoleIdentity(value: unknown): value is RoleIdentity {
  if (typeof value !== "object" || value === null) return false;
  const v = value as { role?: unknown; instance?: unknown };
  return isRole(v.role) && typeof v.instance === "string" && INSTANCE_PATTERN.test(v.instance);
}

/**
 * Checks an identity before a credential is made for it.
 * @throws Error naming what is wrong (an unknown role, an instance outside {@link INSTANCE_PATTERN}).
 */
export function assertRoleIdentity(value: unknown): asserts value is RoleIdentity {
  if (isRoleIdentity(value)) return;
  const v = (typeof value === "object" && value !== null ? value : {}) as { role?: unknown; instance?: unknown };
  if (!isRole(v.role)) throw new Error(`unknown role ${JSON.stringify(v.role)}: expected one of ${ROLES.join(", ")}`);
  throw new Error(`instance ${JSON.stringify(v.instance)} of role ${v.role} must be 1..128 of letters, digits and ._:@-`);
}

/** The identity's URI SAN: `spiffe://ioasid-fabric/<role>/<instance>` (the instance percent-encoded). */
export function toIdentityUri(identity: RoleIdentity): string {
  assertRoleIdentity(identity);
  return `${URI_PREFIX}${identity.role}/${encodeURIComponent(identity.instance)}`;
}

/** The identity a URI SAN names, or undefined when it is not a well-formed identity URI of this trust domain. */
export function fromIdentityUri(uri: string): RoleIdentity | undefined {
  if (!uri.startsWith(URI_PREFIX)) return undefined;
  const parts = uri.slice(URI_PREFIX.length).split("/");
  if (parts.length !== 2) return undefined;
  const [role, encoded] = parts as [string, string];
  let instance: string;
  try {
    instance = decodeURIComponent(encoded);
  } catch {
    return undefined;
  }
  const identity = { role, instance };
  return isRoleIdentity(identity) ? identity : undefined;
}

/** `<role>/<instance>`: the certificate's CN, and how logs and refusals name a caller. */
export function formatIdentity(identity: RoleIdentity): string {
  return `${identity.role}/${identity.instance}`;
}

/**
 * The identity a certificate's subjectAltName names, in the form Node prints it
 * (`tls.PeerCertificate.subjectaltname`, `X509Certificate.subjectAltName`:
 * `URI:spiffe://…, DNS:localhost, IP Address:127.0.0.1`). Exactly one identity URI must be there:
 * none, or two (which one would speak?), is undefined.
 */
export function identityFromSubjectAltName(subjectAltName: string | undefined): RoleIdentity | undefined {
  if (subjectAltName === undefined) return undefined;
  let found: RoleIdentity | undefined;
  let count = 0;
  for (const entry of subjectAltName.split(", ")) {
    if (!entry.startsWith("URI:")) continue;
    let uri = entry.slice("URI:".length);
    // Node quotes a value holding characters that would make the list ambiguous (CVE-2021-44532).
    if (uri.startsWith('"')) {
      try {
        uri = JSON.parse(uri) as string;
      } catch {
        return undefined;
      }
    }
    if (!uri.startsWith(URI_PREFIX)) continue;
    count++;
    found = fromIdentityUri(uri);
  }
  return count === 1 ? found : undefined;
}

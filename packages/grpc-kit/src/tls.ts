import { existsSync } from "node:fs";
import { join } from "node:path";
import type { PeerCertificate } from "node:tls";
import { credentials, ServerCredentials, type ChannelCredentials } from "@grpc/grpc-js";
import { formatIdentity, identityFromSubjectAltName, readInstanceCredentials, type InstanceCredentials, type Role, type RoleIdentity } from "@ioasid/security";

// mTLS between services (DESIGN §11): every server demands a client certificate signed by the stack
// CA, every client presents its instance's certificate, and who the peer is comes from the identity
// URI in its certificate — never from anything the peer says in a request.

/** The environment variable naming a role instance's credentials directory (ca.pem, cert.pem, key.pem). */
export const CREDENTIALS_DIR_ENV = "IOASID_CREDENTIALS_DIR";

/**
 * The role instance's credentials named by {@link CREDENTIALS_DIR_ENV}, read and checked; undefined
 * when the variable is unset or empty, or the directory holds no `cert.pem` (the process runs without
 * TLS, as before).
 * @param expect the role the process is: credentials of another role are a configuration error.
 * @throws Error saying what is wrong with the directory (see `readInstanceCredentials`), or that it
 *   speaks for another role.
 */
export function loadCredentials(env: NodeJS.ProcessEnv = process.env, expect?: { readonly role: Role }): InstanceCredentials | undefined {
  const dir = env[CREDENTIALS_DIR_ENV];
  if (dir === undefined || dir === "") return undefined;
  // The same directory carries the NATS user (nats.json); a directory without a certificate is a
  // NATS-only credential (the testkit's, for now): gRPC runs without TLS then.
  // A directory that does not exist is an error (below), not a quiet fall back to no TLS.
  if (existsSync(dir) && !existsSync(join(dir, "cert.pem"))) return undefined;
  const creds = readInstanceCredentials(dir);
  if (expect !== undefined && creds.identity.role !== expect.role) {
    throw new Error(`${CREDENTIALS_DIR_ENV}=${dir} holds the credentials of ${formatIdentity(creds.identity)}, not of role ${expect.role}`);
  }
  return creds;
}

/**
 * {@link loadCredentials} for a process's start: a problem is printed as one line on stderr and the
 * process exits 2 (as `configOrExit` does for the rest of the configuration).
 */
export function credentialsOrExit(options: {
  readonly service: string;
  readonly role: Role;
  readonly env?: NodeJS.ProcessEnv;
}): InstanceCredentials | undefined {
  try {
    return loadCredentials(options.env ?? process.env, { role: options.role });
  } catch (err) {
    process.stderr.write(`${options.service}: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exit(2);
  }
}

/**
 * Server credentials of a role instance: its certificate, and a client certificate signed by the
 * stack CA required on every connection (a client without one, or with another CA's, fails the
 * handshake: the call never reaches a handler).
 */
export function serverCredentials(creds: InstanceCredentials): ServerCredentials {
  return ServerCredentials.createSsl(creds.ca, [{ cert_chain: creds.cert, private_key: creds.key }], true);
}

/** Options of {@link clientCredentials}. */
export interface ClientCredentialsOptions {
  /** The role the server must prove it is (its certificate's identity); unchecked when omitted. */
  readonly serverRole?: Role;
}

/**
 * Client credentials of a role instance: it trusts the stack CA only and presents its own
 * certificate. The server is recognised by the identity in its certificate, not by host name: the
 * address dialled (`127.0.0.1:port`, a compose service name) says where the server is, the stack
 * CA's signature says who it is — so no `grpc.ssl_target_name_override` is needed anywhere.
 */
export function clientCredentials(creds: InstanceCredentials, options: ClientCredentialsOptions = {}): ChannelCredentials {
  return credentials.createSsl(creds.ca, creds.key, creds.cert, {
    checkServerIdentity: (_host, cert) => serverIdentityProblem(cert, options.serverRole),
  });
}

/** Why a server certificate (already verified against the stack CA) is not acceptable, or undefined. */
function serverIdentityProblem(cert: PeerCertificate, role: Role | undefined): Error | undefined {
  const identity = identityFromSubjectAltName(cert.subjectaltname);
  if (identity === undefined) return new Error("the server's certificate names no role identity (spiffe://ioasid-fabric/<role>/<instance>)");
  if (role !== undefined && identity.role !== role) return new Error(`the server is ${formatIdentity(identity)}, not a ${role}`);
  return undefined;
}

/** What {@link callerIdentity} reads: a grpc-js server call or intercepting call (`getAuthContext`). */
export interface AuthenticatedCall {
  getAuthContext(): { readonly sslPeerCertificate?: PeerCertificate } | null;
}

/**
 * The caller's identity: the one identity URI of the client certificate the TLS handshake verified
 * against the stack CA. Undefined on a connection without TLS or without a client certificate, or
 * when the certificate names no identity (or two).
 */
export function callerIdentity(call: AuthenticatedCall): RoleIdentity | undefined {
  const session = connectionOf(call);
  if (session !== undefined) {
    const known = IDENTITY_OF_CONNECTION.get(session);
    if (known !== undefined) return known === NO_IDENTITY ? undefined : known;
  }
  const peer = call.getAuthContext()?.sslPeerCertificate;
  const identity = peer === undefined ? undefined : identityFromSubjectAltName(peer.subjectaltname);
  if (session !== undefined) IDENTITY_OF_CONNECTION.set(session, identity ?? NO_IDENTITY);
  return identity;
}

/**
 * The caller identity of each HTTP/2 connection, read once. Reading it means Node building the peer
 * certificate's JavaScript object (`getPeerCertificate()`), which the benchmark found costs a
 * secure call more than TLS itself (≈ +120 µs per call on the 2-core machine against +20 µs for
 * TLS). A connection's client certificate cannot change (Node's TLS offers no renegotiation to a
 * client, nor TLS 1.3 post-handshake authentication), and the session object is unique to its
 * connection and collected with it, so the cache can neither go stale nor grow.
 */
const IDENTITY_OF_CONNECTION = new WeakMap<object, RoleIdentity | typeof NO_IDENTITY>();
const NO_IDENTITY = Symbol("no identity");

/**
 * The HTTP/2 session a grpc-js server call came on, when the call exposes it: grpc-js 1.14's base
 * server call keeps its stream as `stream`, and each interceptor's call the one it wraps as
 * `nextCall`. Undefined for anything else (then the identity is read each time: correct, only slower).
 */
export function connectionOf(call: AuthenticatedCall): object | undefined {
  // An interceptor after the first is handed the one before's ServerInterceptingCall, which keeps
  // the call it wraps as `nextCall`: the core's authorization, behind the call observer and the role
  // refusal, found no session and read the certificate on every call (issue 15's crowd profile).
  let c: unknown = call;
  for (let depth = 0; depth < 16 && typeof c === "object" && c !== null; depth++) {
    const session = (c as { stream?: { session?: unknown } }).stream?.session;
    if (typeof session === "object" && session !== null) return session;
    c = (c as { nextCall?: unknown }).nextCall;
  }
  return undefined;
}

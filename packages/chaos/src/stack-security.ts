import { credentials } from "@grpc/grpc-js";
import { Code, isDomainError } from "@ioasid/errors";
import { checkHealth, ServingStatus, type CreateClientOptions } from "@ioasid/grpc-kit";
import type { InstanceCredentials, Role } from "@ioasid/security";
import { connect } from "@nats-io/transport-node";

// A chaos run tests the stack as it is deployed: authenticated (DESIGN §11). A stack that is
// insecure by accident — a service given a NATS-only credentials directory serves plaintext
// (grpc-kit `loadCredentials`), a nats-server without authorization lets anyone in — would still
// pass every invariant, and the run would test something else than it says. So the chaos stack
// probes each service and the broker at start and refuses to run on what it finds open.

/** A service the probe checks: where it listens and the role its certificate must name. */
export interface SecurityProbeTarget {
  /** The service's name, for the message ("ioasid-core"). */
  readonly name: string;
  /** `127.0.0.1:<port>`. */
  readonly address: string;
  readonly role: Role;
}

/** Options of {@link assertServicesSecure}. */
export interface SecurityProbeOptions {
  /** Deadline of one probe call, in ms. @default 2000 */
  readonly callDeadlineMs?: number;
  /** Time a service gets to give a conclusive answer to every probe, in ms. @default 20000 */
  readonly timeoutMs?: number;
}

/** What a probe call came to: the server answered, refused the connection, or neither (yet). */
type ProbeOutcome = "answered" | "refused" | "inconclusive";

/**
 * Checks that every target demands mTLS and is who it says: a plaintext client and a TLS client
 * without a certificate are refused at the handshake (UNAVAILABLE, before any handler — the
 * refusal grpc-kit's `serverCredentials` gives), and `operator` (a certificate of the stack CA) gets
 * SERVING from a server that proves `target.role` by its certificate (grpc-kit `checkServerIdentity`).
 * A call that only timed out proves nothing either way and is tried again, within `timeoutMs`.
 * @throws Error `INSECURE: …` naming the service that answered a client without a certificate;
 *   Error naming the service that did not answer the operator, or not conclusively in time
 */
export async function assertServicesSecure(
  targets: readonly SecurityProbeTarget[],
  operator: InstanceCredentials,
  options: SecurityProbeOptions = {},
): Promise<void> {
  const deadlineMs = options.callDeadlineMs ?? 2000;
  const timeoutMs = options.timeoutMs ?? 20_000;
  // TLS trusting the stack CA but presenting no certificate; the server is not checked (it is the
  // client that must be refused here, whoever the server is).
  const noCertificate: CreateClientOptions = {
    credentials: credentials.createSsl(operator.ca, null, null, { checkServerIdentity: () => undefined }),
    channelOptions: { "grpc.ssl_target_name_override": "localhost" },
  };
  await Promise.all(
    targets.map(async (t) => {
      const until = performance.now() + timeoutMs;
      const probes: ReadonlyArray<{ readonly what: string; readonly client: Omit<CreateClientOptions, "deadlineMs">; readonly want: ProbeOutcome }> = [
        // The plaintext client first: a service serving plaintext is named INSECURE. Then the
        // legitimate client: once it is answered, the server is there and speaks TLS as a
        // `role` (so the refusals around it were its handshake, not a server that is not there).
        { what: "a plaintext client", client: {}, want: "refused" },
        { what: `the operator's certificate (the server proving it is ${t.role})`, client: { tls: operator, serverRole: t.role }, want: "answered" },
        { what: "a TLS client without a certificate", client: noCertificate, want: "refused" },
      ];
      for (const probe of probes) {
        let last: ProbeOutcome = "inconclusive";
        let why = "";
        // Bounded: each try takes at most deadlineMs, and tries stop at `until`.
        for (let attempt = 0; attempt < 100; attempt++) {
          ({ outcome: last, why } = await probeOnce(t.address, probe.client, deadlineMs));
          if (last !== "inconclusive" || performance.now() >= until) break;
          await new Promise((r) => setTimeout(r, 200));
        }
        if (last === probe.want) continue;
        if (probe.want === "refused" && last === "answered") {
          throw new Error(
            `INSECURE: ${t.name} at ${t.address} answered ${probe.what}: it does not demand mTLS (is its IOASID_CREDENTIALS_DIR a NATS-only directory, without cert.pem?); a chaos run is authenticated (DESIGN §11)`,
          );
        }
        throw new Error(
          `${t.name} at ${t.address}: ${probe.what} was ${last === "refused" ? "refused" : "not answered conclusively"} within ${timeoutMs} ms: ${why}`,
        );
      }
    }),
  );
}

/** One health check with the given client options, and what it came to. */
async function probeOnce(
  address: string,
  client: Omit<CreateClientOptions, "deadlineMs">,
  deadlineMs: number,
): Promise<{ outcome: ProbeOutcome; why: string }> {
  try {
    const status = await checkHealth(address, "", { deadlineMs, client });
    return status === ServingStatus.SERVING ? { outcome: "answered", why: "" } : { outcome: "inconclusive", why: `health ${status}` };
  } catch (err) {
    // A handshake refused (no certificate, a wrong CA, the server failing our identity check) is
    // UNAVAILABLE at once; a deadline means the server did not get to answer at all.
    if (isDomainError(err) && err.code === Code.UNAVAILABLE) return { outcome: "refused", why: err.message };
    return { outcome: "inconclusive", why: String((err as Error)?.message ?? err) };
  }
}

/**
 * Checks that nats-server at `url` refuses a client without a credential (DESIGN §11: a user per
 * role instance, nobody anonymous).
 * @throws Error `INSECURE: …` when an anonymous client gets in; Error when the server cannot be
 *   reached at all within `timeoutMs`
 */
export async function assertNatsRefusesAnonymous(url: string, timeoutMs = 5000): Promise<void> {
  let nc;
  try {
    nc = await connect({ servers: url, name: "chaos-security-probe", reconnect: false, timeout: timeoutMs });
  } catch (err) {
    if (/authoriz/i.test(String((err as Error)?.message ?? err)) || (err as { code?: string }).code === "AUTHORIZATION_VIOLATION") return;
    throw new Error(`nats-server at ${url} could not be reached to check that it refuses anonymous clients: ${String((err as Error)?.message ?? err)}`, {
      cause: err,
    });
  }
  await nc.close();
  throw new Error(`INSECURE: nats-server at ${url} let a client without a credential in; a chaos run is authenticated (DESIGN §11)`);
}

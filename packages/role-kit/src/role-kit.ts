import { connect, type NatsConnection } from "@nats-io/transport-node";
import { createClient, defineConfigSchema, traceConfig, type CreateClientOptions, type PromiseClient } from "@ioasid/grpc-kit";
import { core } from "@ioasid/proto";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { NATS_CREDENTIAL_FILE, natsConnectOptions, readNatsCredential } from "@ioasid/security";
import type { Logger } from "pino";

/** The CoreService client every role uses. */
export type CoreClient = PromiseClient<typeof core.CoreServiceService>;

/**
 * Environment variables of every process on the bus, the core included: where NATS is, the bus
 * prefix, the log level, and where trace spans go (`traceConfig`).
 */
export const busConfig = defineConfigSchema({
  natsUrl: {
    name: "NATS_URL",
    kind: "url",
    protocols: ["nats:", "tls:"],
    list: true,
    default: "nats://127.0.0.1:4222",
    doc: "NATS server (with JetStream) carrying the IOASID event deliveries, the history and the core's operation log; in a NATS cluster, its servers' URLs comma-separated (the connection rides reconnects from one to another).",
  },
  natsConnectTimeout: {
    name: "IOASID_NATS_CONNECT_TIMEOUT",
    kind: "duration-ms",
    default: 10_000,
    doc: "How long to keep trying to reach NATS at start before giving up (exit 1).",
  },
  credentialsDir: {
    name: "IOASID_CREDENTIALS_DIR",
    kind: "string",
    default: "",
    doc: "This role instance's credentials directory (nats.json: its NATS user; made by `ioasidctl up` or the compose init step). Empty: connect without a credential (a server without authorization).",
  },
  prefix: {
    name: "IOASID_BUS_PREFIX",
    kind: "string",
    default: "ioasid.v1",
    doc: "Subject prefix of the event bus (deliveries, hellos, history, the operation log).",
  },
  logLevel: {
    name: "LOG_LEVEL",
    kind: "enum",
    values: ["fatal", "error", "warn", "info", "debug", "trace", "silent"],
    default: "info",
    doc: "Log level of the JSON log on stdout.",
  },
  ...traceConfig,
});

/**
 * Environment variables every role shares (spread them into the role's own schema): where the
 * core is, plus {@link busConfig}.
 */
export const commonRoleConfig = defineConfigSchema({
  coreAddress: {
    name: "IOASID_CORE_ADDRESS",
    kind: "address",
    list: true,
    default: "127.0.0.1:50051",
    doc: "host:port of ioasid-core's gRPC server; with a standby core, both comma-separated (the client uses the one that serves and follows a takeover).",
  },
  stateWriteTimeout: {
    name: "IOASID_STATE_WRITE_TIMEOUT",
    kind: "duration-ms",
    default: 5000,
    doc: "How long one write of the role's kept state waits for JetStream's acknowledgement before it is retried.",
  },
  stateWriteRetry: {
    name: "IOASID_STATE_WRITE_RETRY",
    kind: "duration-ms",
    default: 20_000,
    doc:
      "How long a state write JetStream did not acknowledge (timed out, or no JetStream answered) is retried, from its first failure, " +
      "with backoff (0.1 s doubling to 2 s), before the role stops (exit 1: a restart restores what was kept and reconciles); 0: never retried. " +
      "At start, opening and reading the kept state is retried within the same bound while JetStream does not answer (a cluster electing leaders).",
  },
  ...busConfig,
});

/**
 * Connects to NATS, retrying until `timeoutMs` has passed (a service may start before NATS). With a
 * credentials directory it connects as that role instance's NATS user (DESIGN §11), with that
 * user's own inbox prefix (the only inbox its permissions let it read).
 * @throws the last connection error after the timeout; at once when the credential cannot be read
 *   or the server refuses it (a wrong credential does not get better by retrying)
 */
export async function connectNats(
  url: string,
  options: { name: string; timeoutMs?: number; logger?: Logger; credentialsDir?: string },
): Promise<NatsConnection> {
  // A credentials directory without nats.json carries only the gRPC certificate: no NATS user then.
  const dir = options.credentialsDir ?? "";
  const auth = dir === "" || (existsSync(dir) && !existsSync(join(dir, NATS_CREDENTIAL_FILE))) ? {} : natsConnectOptions(readNatsCredential(dir));
  const deadline = Date.now() + (options.timeoutMs ?? 10_000);
  for (let attempt = 0; ; attempt++) {
    try {
      // noAsyncTraces: nats.js otherwise builds an Error (a stack capture) for every request it
      // sends, to report where a timeout came from; every JetStream publish is a request, so that
      // was a third of the IOMMU's CPU when a crowd of guests crashed (issue 15 item 1). Our own
      // errors say which write timed out (role-state.ts StateWriteError, op-log.ts).
      return await connect({ servers: url.split(","), name: options.name, maxReconnectAttempts: -1, reconnectTimeWait: 250, noAsyncTraces: true, ...auth });
    } catch (err) {
      if (Date.now() >= deadline || /Authorization Violation|authentication/i.test(String(err))) throw err;
      if (attempt === 0) options.logger?.warn({ url }, "NATS not reachable yet; retrying");
      await new Promise((r) => setTimeout(r, 250));
    }
  }
}

/**
 * A CoreService client with the given default deadline; over mTLS when given the role instance's
 * credentials (grpc-kit `credentialsOrExit`), and then only to a server that proves it is the core.
 */
export function createCoreClient(address: string, deadlineMs = 5000, tls?: CreateClientOptions["tls"]): CoreClient {
  return createClient(core.CoreServiceService, address, { deadlineMs, ...(tls === undefined ? {} : { tls, serverRole: "core" }) });
}

import { fileURLToPath } from "node:url";
import { core } from "@ioasid/proto";
import { createClient, type PromiseClient } from "@ioasid/grpc-kit";
import { startNats, natsEnv, startService, type NatsServer, type ServiceProcess } from "@ioasid/testkit";
import { DomainError } from "@ioasid/errors";
import { expect } from "vitest";

/** Absolute path of a built service main. */
export function serviceEntry(service: string): string {
  return fileURLToPath(new URL(`../../services/${service}/dist/main.js`, import.meta.url));
}

/** A core process on an ephemeral port, its nats-server, and a client of it. */
export interface CoreFixture {
  readonly proc: ServiceProcess;
  readonly nats: NatsServer;
  readonly client: PromiseClient<typeof core.CoreServiceService>;
  /** Stops the core (SIGTERM) and, if the fixture started it, its nats-server; the core's exit code. */
  stop(): Promise<number | null>;
}

/**
 * Starts the built ioasid-core as a child process (as in production) with its operation log on a
 * nats-server (its own unless one is given), and connects a client.
 */
export async function startCore(env: Record<string, string> = {}, options: { nats?: NatsServer } = {}): Promise<CoreFixture> {
  const nats = options.nats ?? (await startNats());
  let proc: ServiceProcess;
  try {
    proc = await startService({
      name: "ioasid-core",
      entry: serviceEntry("ioasid-core"),
      env: { IOASID_CORE_GRPC_ADDRESS: "127.0.0.1:0", ...(await natsEnv(nats, "core", env)), ...env },
    });
  } catch (err) {
    if (options.nats === undefined) await nats.stop();
    throw err;
  }
  const client = createClient(core.CoreServiceService, proc.address, { deadlineMs: 5000 });
  return {
    proc,
    nats,
    client,
    async stop() {
      client.close();
      const code = await proc.stop();
      if (options.nats === undefined) await nats.stop();
      return code;
    },
  };
}

/** Awaits a call that must fail, and checks its status code and reason. */
export async function expectRefused(call: Promise<unknown>, code: number, reason: string): Promise<DomainError> {
  let result: unknown;
  try {
    result = await call;
  } catch (err) {
    expect(err).toBeInstanceOf(DomainError);
    const e = err as DomainError;
    expect({ code: e.code, reason: e.reason }).toEqual({ code, reason });
    expect(e.message.length).toBeGreaterThan(0);
    return e;
  }
  throw new Error(`expected ${reason}, got success: ${JSON.stringify(result, (_k, v) => (typeof v === "bigint" ? String(v) : v))}`);
}

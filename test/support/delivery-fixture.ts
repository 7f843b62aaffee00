import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import type { events } from "@ioasid/proto";
import { core } from "@ioasid/proto";
import { startService, waitFor, type NatsServer, type ServiceProcess } from "@ioasid/testkit";
import type { CoreFixture } from "./core-fixture.js";

/** One line a test subscriber logged for an event it received or handled. */
export interface SubscriberLine {
  readonly msg: "received" | "handled";
  readonly seq: number;
  readonly type: string;
  readonly ioasid: number;
  readonly reg?: number;
  readonly start: number;
  readonly end?: number;
  readonly attempt: number;
  readonly batch?: number;
}

/** A test subscriber process (test/support/test-subscriber.ts). */
export interface TestSubscriber {
  readonly proc: ServiceProcess;
  readonly name: string;
  readonly instance: string;
  /** Its log lines so far. */
  lines(): SubscriberLine[];
  handled(type?: string): SubscriberLine[];
}

// The subscriber runs as node runs a service: built (tsc -b puts it in test/dist/support/).
const here = fileURLToPath(import.meta.url);
const entry = here.includes("/test/dist/")
  ? join(dirname(here), "test-subscriber.js")
  : fileURLToPath(new URL("../dist/support/test-subscriber.js", import.meta.url));

/** Starts a test subscriber process on the fixture's nats-server. */
export async function startSubscriberProcess(nats: NatsServer, name: string, instance: string, env: Record<string, string> = {}): Promise<TestSubscriber> {
  const proc = await startService({
    name: `${name}/${instance}`,
    entry,
    env: { NATS_URL: nats.url, SUB_NAME: name, SUB_INSTANCE: instance, ...env },
  });
  const lines = (): SubscriberLine[] =>
    proc
      .logs()
      .split("\n")
      .filter((l) => l.startsWith('{"msg":"received"') || l.startsWith('{"msg":"handled"'))
      .map((l) => JSON.parse(l) as SubscriberLine);
  return {
    proc,
    name,
    instance,
    lines,
    handled: (type) => lines().filter((l) => l.msg === "handled" && (type === undefined || l.type === type)),
  };
}

type Scope = { $case: "global"; value: boolean } | { $case: "setId"; value: number } | { $case: "mmToken"; value: bigint };

/** Registers a subscriber with the core. */
export async function register(c: CoreFixture["client"], name: string, instance: string, priority: events.Priority, scope: Scope): Promise<number> {
  const r = await c.register(core.RegisterRequest.fromPartial({ subscriber: { name, instance }, priority, scope }));
  return r.registration!.registrationId;
}

/** Waits until the core has no delivery in progress (pending) and, unless allowed, none missed. */
export async function deliveriesSettled(c: CoreFixture["client"], options: { allowMissed?: boolean; timeoutMs?: number } = {}): Promise<void> {
  await waitFor(
    async () => {
      const s = await c.getStats({});
      return s.deliveriesPending === 0 && (options.allowMissed === true || s.deliveriesMissed === 0);
    },
    { timeoutMs: options.timeoutMs ?? 15_000, intervalMs: 25, message: "every delivery acknowledged" },
  );
  // A subscriber logs a line before it acknowledges, but the line comes on its stdout pipe and
  // the stats on a gRPC socket: one poll round can hand us the stats first. Let the pipes drain.
  await new Promise((r) => setTimeout(r, 50));
}

/** Whether the IOASID is still allocated (ACTIVE or FREE_PENDING). */
export async function exists(c: CoreFixture["client"], ioasid: number): Promise<boolean> {
  try {
    await c.describe({ ioasid });
    return true;
  } catch (err) {
    if ((err as { reason?: string }).reason === "IOASID_NOT_FOUND") return false;
    throw err;
  }
}

#!/usr/bin/env node
// A notifier subscriber process for the delivery tests: the bus SDK with a handler that logs
// every event it handles as a JSON line, optionally waits, and releases a reference on FREE.
//   NATS_URL, SUB_NAME, SUB_INSTANCE   who it is
//   SUB_RELEASE       purpose of the reference to release with the ack of FREE (empty: none)
//   SUB_DELAY_MS      time each handler takes
//   SUB_DELAY_TYPES   comma-separated event types the delay applies to (empty: all)
//   SUB_FAIL_SEQS     comma-separated event seqs whose handler throws (once each)
//   SUB_DETACH_SPID   "1": acknowledge FREE with the SPID detach (as the IOMMU does)
//   SUB_RECORD        "1": record each handling in the history (a note with the event's seq), as roles do
//   SUB_INSTANCES     comma-separated instances this one process serves (as KVM serves its VMs); default SUB_INSTANCE
//   SUB_BUSY_MS       synchronous work each handler does before it returns (the process answers nothing meanwhile)
import { connect } from "@nats-io/transport-node";
import { HistoryRecorder, startSubscriber } from "@ioasid/bus";
import { createGrpcServer, createLogger } from "@ioasid/grpc-kit";
import { events } from "@ioasid/proto";

const env = process.env;
const name = env["SUB_NAME"] ?? "test";
const instance = env["SUB_INSTANCE"] ?? "0";
const release = env["SUB_RELEASE"] ?? "";
const delayMs = Number(env["SUB_DELAY_MS"] ?? "0");
const delayTypes = new Set((env["SUB_DELAY_TYPES"] ?? "").split(",").filter(Boolean));
const busyMs = Number(env["SUB_BUSY_MS"] ?? "0");
const instances = (env["SUB_INSTANCES"] ?? instance).split(",").filter(Boolean);
const failing = new Set((env["SUB_FAIL_SEQS"] ?? "").split(",").filter(Boolean).map(Number));
const now = () => performance.timeOrigin + performance.now();
const line = (o: Record<string, unknown>) => process.stdout.write(`${JSON.stringify(o)}\n`);

const nc = await connect({ servers: env["NATS_URL"] ?? "nats://127.0.0.1:4222", name: `${name}/${instance}`, maxReconnectAttempts: -1 });
const recorder = env["SUB_RECORD"] === "1" ? new HistoryRecorder(nc, name, instance) : undefined;
const subs = await Promise.all(
  instances.map((instance) =>
    startSubscriber({
      nc,
      name,
      instance,
      handler: async (e, ctx) => {
        const start = now();
        const type = events.eventTypeToJSON(e.type).replace("EVENT_TYPE_", "");
        line({
          msg: "received",
          seq: Number(e.seq),
          type,
          ioasid: e.ioasid,
          start,
          attempt: ctx.attempt,
          batch: ctx.batchSize,
          ...(instances.length > 1 ? { instance } : {}),
        });
        // Busy, not asleep: like a role's synchronous handling, it holds the whole process.
        while (now() - start < busyMs);
        if (delayMs > 0 && (delayTypes.size === 0 || delayTypes.has(type))) await new Promise((r) => setTimeout(r, delayMs));
        if (failing.delete(Number(e.seq))) throw new Error(`injected failure for seq ${e.seq}`);
        recorder?.record({ $case: "chaosNote", value: { note: `handled ${type}` } }, { ioasid: e.ioasid, seq: Number(e.seq) });
        line({ msg: "handled", seq: Number(e.seq), type, ioasid: e.ioasid, reg: ctx.registrationId, start, end: now(), attempt: ctx.attempt });
        if (type !== "FREE") return undefined;
        return { release: release === "" ? [] : [release], detachSpid: env["SUB_DETACH_SPID"] === "1" };
      },
    }),
  ),
);
// A health endpoint and the "listening" line the testkit waits for.
const server = createGrpcServer({ service: `${name}-${instance}`, logger: createLogger(`${name}-${instance}`), reflection: false });
await server.listen("127.0.0.1", 0);
process.on("SIGTERM", () => {
  void (async () => {
    await Promise.all(subs.map((sub) => sub.stop()));
    await server.shutdown(200);
    await nc.drain();
    process.exit(0);
  })();
});

import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { jetstreamManager } from "@nats-io/jetstream";
import { roleStateStreamName } from "@ioasid/bus";
import { vdcm } from "@ioasid/proto";
import { startStack, type StackFixture } from "../support/stack-fixture.js";

// A role whose kept state cannot be written any more stops (fail-stop), like the core: going on
// with tables ahead of what it kept would let a later crash bring back entries it already said
// were gone. A restart then restores and reconciles.

let stack: StackFixture;
let nc: NatsConnection;
beforeAll(async () => {
  stack = await startStack();
  nc = await connect({ servers: stack.nats.url });
}, 60_000);
afterAll(async () => {
  await nc?.close();
  await stack?.stop();
});

describe("a role that cannot keep its state", () => {
  it("exits instead of answering as if it had kept the change", async () => {
    await (await jetstreamManager(nc)).streams.delete(roleStateStreamName("ioasid.v1"));
    const call = stack.clients.vdcm.registerDevice(vdcm.RegisterDeviceRequest.fromPartial({ deviceId: "lost0", wqs: [{ wqId: 0, mode: vdcm.WqMode.WQ_MODE_DEDICATED }] }));
    await expect(call).rejects.toBeDefined();
    const status = await stack.procs.vdcm.exited;
    expect(status.code).toBe(1);
    expect(stack.procs.vdcm.logs()).toContain("state store unwritable");
  }, 30_000);
});

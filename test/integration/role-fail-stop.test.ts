import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { jetstreamManager } from "@nats-io/jetstream";
import { readHistory, roleStateStreamName } from "@ioasid/bus";
import { iommu, vdcm } from "@ioasid/proto";
import { startStack, type StackFixture } from "../support/stack-fixture.js";

// A role whose kept state cannot be written any more stops (fail-stop), like the core: going on
// with tables ahead of what it kept would let a later crash bring back entries it already said
// were gone. A restart then restores and reconciles. A write JetStream does not answer is retried
// for IOASID_STATE_WRITE_RETRY first (role-state-retry.test.ts): 1 s here, so that the stream
// deleted below stops the roles within the test.

let stack: StackFixture;
let nc: NatsConnection;
beforeAll(async () => {
  stack = await startStack({ IOASID_STATE_WRITE_RETRY: "1s" });
  nc = await connect({ servers: stack.nats.url });
}, 60_000);
afterAll(async () => {
  await nc?.close();
  await stack?.stop();
});

describe("a role that cannot keep its state", () => {
  it("exits instead of answering as if it had kept the change, and its history never shows the change", async () => {
    const since = Date.now();
    await stack.clients.iommu.registerDevice(
      iommu.RegisterDeviceRequest.fromPartial({ deviceId: "kept1", maxPasids: 64, function: iommu.DeviceFunction.DEVICE_FUNCTION_PF, iommuGroup: 7 }),
    );
    await (await jetstreamManager(nc)).streams.delete(roleStateStreamName("ioasid.v1"));
    const call = stack.clients.vdcm.registerDevice(
      vdcm.RegisterDeviceRequest.fromPartial({ deviceId: "lost0", wqs: [{ wqId: 0, mode: vdcm.WqMode.WQ_MODE_DEDICATED }] }),
    );
    await expect(call).rejects.toBeDefined();
    const status = await stack.procs.vdcm.exited;
    expect(status.code).toBe(1);
    expect(stack.procs.vdcm.logs()).toContain("state store unwritable");

    // The IOMMU's history record of a device it could not keep is held with the change, and goes
    // with the process (a record published before the write would show a device a restart lacks).
    const probe = stack.clients.iommu.registerDevice(
      iommu.RegisterDeviceRequest.fromPartial({ deviceId: "lost1", maxPasids: 64, function: iommu.DeviceFunction.DEVICE_FUNCTION_PF, iommuGroup: 8 }),
    );
    await expect(probe).rejects.toBeDefined();
    expect((await stack.procs.iommu.exited).code).toBe(1);
    const probes = (await readHistory(nc, { sinceMs: since }))
      .filter((r) => r.role === "iommu" && r.action?.$case === "iommuProbeDevice")
      .map((r) => (r.action.$case === "iommuProbeDevice" ? r.action.value.device : undefined));
    expect(probes).toEqual(["kept1"]);
  }, 30_000);
});

import { createServer } from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createClient } from "@ioasid/grpc-kit";
import { iommu, vfio } from "@ioasid/proto";
import { natsEnv, startService, type ServiceProcess } from "@ioasid/testkit";
import { serviceEntry, startCore, type CoreFixture } from "../support/core-fixture.js";
import { startVfio, type VfioFixture } from "../support/vfio-fixture.js";

// VFIO started long before the IOMMU it talks to (compose restarts, `ioasidctl up` in parallel):
// once the IOMMU listens, VFIO's calls and its fault stream reach it within the clients' bounded
// reconnect backoff (1 s), not after grpc-js's default backoff (which grows towards 2 minutes).

const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);

let coreFx: CoreFixture;
let vf: VfioFixture;
let iommuProc: ServiceProcess | undefined;
beforeAll(async () => {
  coreFx = await startCore();
});
afterAll(async () => {
  await vf?.stop();
  await iommuProc?.stop();
  await coreFx?.stop();
});

async function freePort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((resolve) => srv.listen(0, "127.0.0.1", resolve));
  const port = (srv.address() as { port: number }).port;
  await new Promise<void>((resolve) => srv.close(() => resolve()));
  return port;
}

describe("VFIO before its IOMMU", () => {
  it("reaches an IOMMU that starts 5 s after it, within about a second", async () => {
    const iommuAddress = `127.0.0.1:${await freePort()}`;
    vf = await startVfio(coreFx, { IOMMU_ADDRESS: iommuAddress });
    // Five seconds of failed attempts: grpc-js's default backoff would wait ~4 s before the next.
    await new Promise((r) => setTimeout(r, 5000));
    iommuProc = await startService({
      name: "iommu",
      entry: serviceEntry("iommu"),
      env: { IOMMU_GRPC_ADDRESS: iommuAddress, ...(await natsEnv(coreFx.nats, "iommu")), IOASID_CORE_ADDRESS: coreFx.proc.address },
    });
    const io = createClient(iommu.IommuServiceService, iommuAddress);
    try {
      await io.registerDevice(
        P(iommu.RegisterDeviceRequest, {
          deviceId: "late0",
          maxPasids: 64,
          priCapable: true,
          function: iommu.DeviceFunction.DEVICE_FUNCTION_PF,
          iommuGroup: 1,
        }),
      );
      await new Promise((r) => setTimeout(r, 1200));
      const c = await vf.client.openContainer(P(vfio.OpenContainerRequest, { mmToken: 0x1a7en, quota: 2 }));
      const session = new AbortController();
      void (async () => {
        try {
          for await (const _ of vf.client.session({ containerId: c.containerId }, { signal: session.signal }));
        } catch {
          /* ended */
        }
      })();
      // First try, no retry: VFIO's channel to the IOMMU is up again.
      await vf.client.assignDevice(P(vfio.AssignDeviceRequest, { containerId: c.containerId, device: { ref: { $case: "deviceId", value: "late0" } } }));
      session.abort();
    } finally {
      io.close();
    }
    expect(vf.proc.logs()).toContain("the IOMMU's fault stream ended; reopening");
  }, 30_000);
});

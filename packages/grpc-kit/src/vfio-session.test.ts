import { vfio } from "@ioasid/proto";
import { afterEach, describe, expect, it } from "vitest";
import type { CallContext, ServiceHandlers } from "./adapt-service.js";
import { createClient } from "./create-client.js";
import { createLogger } from "./create-logger.js";
import { createGrpcServer, type GrpcServer } from "./grpc-server.js";
import { createVfioSession, decodeVfioCapability, encodeVfioCapability, VFIO_CAPABILITY_METADATA, type VfioSession } from "./vfio-session.js";

const logger = createLogger("test", { level: "silent" });
const CAP = new Uint8Array(32).fill(0xab);

describe("createVfioSession", () => {
  let server: GrpcServer | undefined;
  let session: VfioSession | undefined;
  /** The capability metadata each call arrived with, by method. */
  const seen: Array<[string, unknown[]]> = [];

  afterEach(async () => {
    session?.close();
    await server?.shutdown(100);
    seen.length = 0;
  });

  /** A VfioService whose OpenContainer answers container 7 with {@link CAP}, and which records every call's capability metadata. */
  async function start(): Promise<VfioSession> {
    const record = (name: string, ctx: CallContext) => void seen.push([name, ctx.metadata.get(VFIO_CAPABILITY_METADATA)]);
    // Every method records and answers an empty response; OpenContainer answers container 7 with CAP.
    const handlers: Record<string, unknown> = {};
    for (const [name, method] of Object.entries(vfio.VfioServiceService)) {
      const type = (vfio as unknown as Record<string, { fromPartial(x: object): unknown }>)[`${name[0]!.toUpperCase()}${name.slice(1)}Response`]!;
      handlers[name] = method.responseStream
        ? async (_req: unknown, ctx: CallContext) => void record(name, ctx)
        : (_req: unknown, ctx: CallContext) => {
            record(name, ctx);
            return name === "openContainer" ? type.fromPartial({ containerId: 7, setId: 1, capability: Buffer.from(CAP) }) : type.fromPartial({});
          };
    }
    server = createGrpcServer({ service: "t", logger, reflection: false }).addService(
      vfio.VfioServiceService,
      handlers as unknown as ServiceHandlers<typeof vfio.VfioServiceService>,
    );
    await server.listen("127.0.0.1", 0);
    session = createVfioSession(createClient(vfio.VfioServiceService, `127.0.0.1:${server.port}`, { deadlineMs: 2000 }));
    return session;
  }

  it("remembers the capability OpenContainer answered and sends it, hex, with every later call naming that container", async () => {
    const s = await start();
    await s.allocPasid({ containerId: 7 });
    await s.openContainer(vfio.OpenContainerRequest.fromPartial({ mmToken: 1n }));
    await s.allocPasid({ containerId: 7 });
    for await (const _ of s.watchFaults({ containerId: 7 })) void _;
    await s.allocPasid({ containerId: 8 });
    expect(seen).toEqual([
      ["allocPasid", []],
      ["openContainer", []],
      ["allocPasid", ["ab".repeat(32)]],
      ["watchFaults", ["ab".repeat(32)]],
      ["allocPasid", []],
    ]);
    expect(s.capabilityOf(7)).toEqual(Buffer.from(CAP));
  });

  it("sends a call's own capability metadata as it is, and forgets on request", async () => {
    const s = await start();
    s.remember(7, CAP);
    await s.allocPasid({ containerId: 7 }, { metadata: { [VFIO_CAPABILITY_METADATA]: "00" } });
    s.forget(7);
    await s.allocPasid({ containerId: 7 });
    expect(seen).toEqual([
      ["allocPasid", ["00"]],
      ["allocPasid", []],
    ]);
  });

  it("encodes a capability as lowercase hex and decodes only hex", () => {
    expect(encodeVfioCapability(new Uint8Array([0, 15, 255]))).toBe("000fff");
    expect(decodeVfioCapability("000fff")).toEqual(Buffer.from([0, 15, 255]));
    for (const bad of ["", "0", "zz", "0x00"]) expect(decodeVfioCapability(bad)).toBeUndefined();
  });
});

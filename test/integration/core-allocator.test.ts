import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { core, events } from "@ioasid/proto";
import { Code } from "@ioasid/errors";
import { createGrpcServer, type GrpcServer } from "@ioasid/grpc-kit";
import { waitFor } from "@ioasid/testkit";
import { startCore, expectRefused, type CoreFixture } from "../support/core-fixture.js";

// A custom allocator (e.g. the guest's virtual-command allocator) is a real AllocatorService in
// this process; the core calls it over gRPC once it is registered.

let fixture: CoreFixture;
let allocator: GrpcServer;
let address: string;
const released: number[] = [];
let nextAnswer: () => number;

beforeEach(async () => {
  released.length = 0;
  let next = 4242;
  nextAnswer = () => next++;
  allocator = createGrpcServer({ service: "test-allocator", reflection: false });
  allocator.addService(core.AllocatorServiceService, {
    allocate: (req) => {
      const id = nextAnswer();
      return { ioasid: id >= req.min && id <= req.max ? id : id === 7 ? 7 : 0 };
    },
    release: (req) => {
      released.push(req.ioasid);
      return {};
    },
  });
  address = `127.0.0.1:${await allocator.listen("127.0.0.1", 0)}`;
  fixture = await startCore();
});
afterEach(async () => {
  await fixture?.stop();
  await allocator?.shutdown(500);
});

async function newSet(quota = 8): Promise<number> {
  const r = await fixture.client.createSet(core.CreateSetRequest.fromPartial({ tokenType: events.TokenType.TOKEN_TYPE_MM, token: 77n, quota }));
  return r.set!.setId;
}

describe("ioasid-core custom allocators", () => {
  it("takes precedence once registered, is told of reclaims, and gives way when unregistered", async () => {
    const c = fixture.client;
    const s = await newSet();
    await c.registerAllocator({ name: "vcmd", address });
    expect((await c.getStats({})).allocator).toBe("vcmd");
    const x = await c.alloc(core.AllocRequest.fromPartial({ setId: s }));
    expect(x.ioasid).toBe(4242);
    await expectRefused(c.registerAllocator({ name: "other", address }), Code.ALREADY_EXISTS, "ALLOCATOR_EXISTS");
    await expectRefused(c.unregisterAllocator({ name: "vcmd" }), Code.FAILED_PRECONDITION, "ALLOCATOR_BUSY");
    await c.free(core.FreeRequest.fromPartial({ setId: s, ioasid: x.ioasid }));
    await waitFor(() => released.includes(4242), { timeoutMs: 3000, message: "Release(4242) at the allocator" });
    await c.unregisterAllocator({ name: "vcmd" });
    expect((await c.alloc(core.AllocRequest.fromPartial({ setId: s }))).ioasid).toBe(1);
  });

  it("gives the allocator's answer back when the model refuses the allocation", async () => {
    const c = fixture.client;
    const s = await newSet(1);
    await c.registerAllocator({ name: "vcmd", address });
    await c.alloc(core.AllocRequest.fromPartial({ setId: s }));
    await expectRefused(c.alloc(core.AllocRequest.fromPartial({ setId: s })), Code.RESOURCE_EXHAUSTED, "SET_QUOTA_EXCEEDED");
    await waitFor(() => released.includes(4243), { timeoutMs: 3000, message: "Release(4243) at the allocator" });
    expect((await c.getStats({})).inUse).toBe(1);
  });

  it("refuses with ALLOCATOR_FAILED an answer outside [min, max], and an allocator that is down", async () => {
    const c = fixture.client;
    const s = await newSet();
    await c.registerAllocator({ name: "vcmd", address });
    nextAnswer = () => 7;
    await expectRefused(c.alloc(core.AllocRequest.fromPartial({ setId: s, min: 100, max: 200 })), Code.UNAVAILABLE, "ALLOCATOR_FAILED");
    await allocator.shutdown(100);
    await expectRefused(c.alloc(core.AllocRequest.fromPartial({ setId: s })), Code.UNAVAILABLE, "ALLOCATOR_FAILED");
    expect((await c.getStats({})).inUse).toBe(0);
  });
});

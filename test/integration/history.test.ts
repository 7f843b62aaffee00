import { afterEach, describe, expect, it } from "vitest";
import { connect } from "@nats-io/transport-node";
import { readHistory } from "@ioasid/bus";
import { core, events } from "@ioasid/proto";
import { waitFor } from "@ioasid/testkit";
import { startCore, type CoreFixture } from "../support/core-fixture.js";

// The recorded history the timeline is drawn from: the core's events and every reference change,
// with the count after it, stored in JetStream.

const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);
let fixture: CoreFixture | undefined;
afterEach(async () => {
  await fixture?.stop();
  fixture = undefined;
});

describe("history", () => {
  it("records the core's events and reference changes with their counts, in order", async () => {
    fixture = await startCore();
    const c = fixture.client;
    const since = Date.now();
    const set = (await c.createSet(P(core.CreateSetRequest, { tokenType: events.TokenType.TOKEN_TYPE_MM, token: 5n, quota: 4 }))).set!.setId;
    const { ioasid } = await c.alloc(P(core.AllocRequest, { setId: set }));
    const kvm = { role: "kvm", instance: "vm-1", purpose: "vmcs" };
    await c.get(P(core.GetRequest, { setId: set, ioasid, holder: kvm }));
    await c.free(P(core.FreeRequest, { setId: set, ioasid }));
    await c.put(P(core.PutRequest, { setId: set, ioasid, holder: kvm }));
    const nc = await connect({ servers: fixture.nats.url });
    try {
      let steps: string[] = [];
      await waitFor(
        async () => {
          const h = await readHistory(nc, { sinceMs: since });
          steps = h.filter((r) => r.ioasid === ioasid).map((r) => `${r.action}:${r.refcount}`);
          return steps.length >= 5;
        },
        { timeoutMs: 5000, message: "five history records" },
      );
      expect(steps).toEqual(["event:ALLOC:1", "ioasid_get:2", "event:FREE:1", "ioasid_put:0", "event:RECLAIM:0"]);
    } finally {
      await nc.close();
    }
  });
});

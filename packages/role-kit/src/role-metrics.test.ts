import { MemoryRoleState, type EventHandler, type StateCodec } from "@ioasid/bus";
import { events } from "@ioasid/proto";
import { Registry } from "prom-client";
import { describe, expect, it } from "vitest";
import { createRoleMetrics } from "./role-metrics.js";

const FREE = { type: events.EventType.EVENT_TYPE_FREE } as events.IoasidEvent;
const ctx = { registrationId: 1, attempt: 1, batchSize: 1 };

describe("role metrics", () => {
  it("counts the deliveries a handler settled or failed by event type, and keeps a synchronous handler synchronous", async () => {
    const registry = new Registry();
    const m = createRoleMetrics(registry);
    const sync: EventHandler = () => ({ release: ["vmcs"] });
    expect(m.handler(sync)(FREE, ctx)).toEqual({ release: ["vmcs"] });
    await expect(m.handler(async () => Promise.reject(new Error("busy")))(FREE, ctx)).rejects.toThrow("busy");
    expect(() =>
      m.handler(() => {
        throw new Error("broken");
      })(FREE, ctx),
    ).toThrow("broken");
    const text = await registry.metrics();
    expect(text).toContain('ioasid_role_deliveries_handled_total{type="FREE",outcome="settled"} 1');
    expect(text).toContain('ioasid_role_deliveries_handled_total{type="FREE",outcome="failed"} 2');
  });

  it("times each state write to the store, failed ones apart", async () => {
    const registry = new Registry();
    const m = createRoleMetrics(registry);
    const codec: StateCodec<string> = { format: "test.Entry", encode: (v) => new TextEncoder().encode(v), decode: (b) => new TextDecoder().decode(b) };
    const store = m.store(new MemoryRoleState(codec));
    await store.write([{ key: "a", value: "1" }]);
    await store.write([{ key: "b", value: "2" }]);
    await expect(m.store({ write: () => Promise.reject(new Error("no JetStream")) }).write([])).rejects.toThrow("no JetStream");
    const text = await registry.metrics();
    expect(text).toContain('ioasid_role_state_write_seconds_count{outcome="ok"} 2');
    expect(text).toContain('ioasid_role_state_write_seconds_count{outcome="error"} 1');
  });
});

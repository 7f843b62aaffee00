import { Registry } from "prom-client";
import { describe, expect, it } from "vitest";
import { createCoreMetrics, missReason, tierName } from "./core-metrics.js";
import { IoasidCore } from "./ioasid-core.js";

describe("core metrics", () => {
  it("names tiers by their notifier priority (ioasid.rst call order)", () => {
    expect([3, 2, 1, 0, 7].map(tierName)).toEqual(["CPU", "DEVICE", "IOMMU", "LAST", "7"]);
  });

  it("turns a miss's reason into a closed set, a handler's error text dropped", () => {
    expect(["not live", "no ack", "deadline exceeded", "no responders", "handler failed: disk on fire", "socket hang up"].map(missReason)).toEqual([
      "not_live",
      "no_ack",
      "deadline_exceeded",
      "no_responders",
      "handler_failed",
      "other",
    ]);
  });

  it("counts deliveries by tier and outcome, misses by subscriber and reason, late acks by subscriber", async () => {
    const registry = new Registry();
    const m = createCoreMetrics(registry);
    const kvm = { name: "kvm", instance: "vm-1" };
    m.delivered({ registrationId: 1, subscriber: kvm, priority: 3 }, "acked", 0.002);
    m.delivered({ registrationId: 2, subscriber: { name: "vdcm", instance: "idxd0" }, priority: 2 }, "missed", 2);
    m.missed([{ seq: 5, registrationId: 2, subscriber: { name: "vdcm", instance: "idxd0" }, reason: "deadline exceeded" }]);
    m.acked([
      { seq: 5, registrationId: 2, subscriber: { name: "vdcm", instance: "idxd0" }, event: {} as never, releases: [], detachSpid: false, late: true },
      { seq: 6, registrationId: 1, subscriber: kvm, event: {} as never, releases: [], detachSpid: false, late: false },
    ]);
    const text = await registry.metrics();
    expect(text).toContain('ioasid_deliveries_total{tier="CPU",outcome="acked"} 1');
    expect(text).toContain('ioasid_deliveries_total{tier="DEVICE",outcome="missed"} 1');
    expect(text).toContain('ioasid_delivery_seconds_bucket{le="2.5",tier="DEVICE",outcome="missed"} 1');
    expect(text).toContain('ioasid_delivery_misses_total{subscriber="vdcm",reason="deadline_exceeded"} 1');
    expect(text).toContain('ioasid_delivery_late_acks_total{subscriber="vdcm"} 1');
    expect(text).not.toContain('ioasid_delivery_late_acks_total{subscriber="kvm"}');
  });

  it("shows the model at every scrape: IOASIDs by set and state, references by role; a FREE timed to its RECLAIM", async () => {
    const registry = new Registry();
    const core = new IoasidCore({ capacity: 64 });
    const stop = createCoreMetrics(registry).follow(core, undefined);
    const set = (await core.commit({ kind: "createSet", token: { type: "MM", value: 7n }, quota: 4 })) as { id: number };
    const a = await core.alloc(set.id, {});
    await core.alloc(set.id, {});
    const kvm = { role: "kvm", instance: "vm-1", purpose: "vmcs" };
    await core.commit({ kind: "get", setId: set.id, ioasid: a.ioasid, holder: kvm, generation: a.generation });
    await core.commit({ kind: "free", setId: set.id, ioasid: a.ioasid, generation: a.generation });
    let text = await registry.metrics();
    expect(text).toContain(`ioasid_ioasids{set="${set.id}",state="ACTIVE"} 1`);
    expect(text).toContain(`ioasid_ioasids{set="${set.id}",state="FREE_PENDING"} 1`);
    expect(text).toContain('ioasid_references{role="set-owner"} 1');
    expect(text).toContain('ioasid_references{role="kvm"} 1');
    expect(text).toContain("ioasid_reclaim_seconds_count 0");
    // The last reference released: reclaimed, and the next scrape (a later turn) says so.
    await core.commit({ kind: "put", setId: set.id, ioasid: a.ioasid, holder: kvm, generation: a.generation });
    await new Promise((r) => setImmediate(r));
    text = await registry.metrics();
    expect(text).toContain(`ioasid_ioasids{set="${set.id}",state="FREE_PENDING"} 0`);
    expect(text).not.toContain('ioasid_references{role="kvm"}');
    expect(text).toContain("ioasid_reclaim_seconds_count 1");
    expect(text).toContain('ioasid_events_total{type="FREE"} 1');
    expect(text).toContain('ioasid_events_total{type="RECLAIM"} 1');
    stop();
    core.close();
  });
});

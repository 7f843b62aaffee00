import { readFileSync } from "node:fs";
import { createHistoryRecord, eventTypeOf, parseHistoryJsonl, type HistoryFields, type HistoryLink, type HistoryRecord } from "@ioasid/bus";
import { history as h } from "@ioasid/proto";
import { describe, expect, it } from "vitest";
import { check, renderVerdict } from "./checker.js";
import type { FinalState } from "./final-state.js";
import { correctFinalState, correctHistory, GUEST_2, HistoryBuilder, openGuest, setUp, type BuilderOptions } from "./history-fixture.js";
import { orderHistory } from "./history-order.js";

// Order without clocks (issue 18): the checker orders records by what they carry — each
// publisher's sequence, the core's op-log sequence, event → handling, causal links — so a host
// whose clock is off by seconds neither makes a correct history fail nor hides a broken one.

/** The VDCM's, the IOMMU's and VFIO's host 5 s behind the core's, the KVMs' and the driver's. */
const BEHIND: BuilderOptions = { sequenced: true, skewMs: { vdcm: -5000, iommu: -5000, vfio: -5000 } };
/** The same hosts 5 s ahead. */
const AHEAD: BuilderOptions = { sequenced: true, skewMs: { vdcm: 5000, iommu: 5000, vfio: 5000 } };

/** The history with every ordering field taken out: what a checker that orders by time sees. */
function clocksOnly(history: readonly HistoryRecord[]): HistoryRecord[] {
  return history.map((r) => {
    const { publisherSeq: _p, opSeq: _o, ...rest } = r;
    return { ...rest, incarnation: "", after: [] };
  });
}

const at = (r: HistoryRecord, fields: HistoryFields = {}): HistoryRecord =>
  createHistoryRecord({ role: r.role, instance: r.instance }, { $case: "chaosNote", value: { note: "x" } }, fields, r.ts);
const rec = (role: string, instance: string, ts: number, fields: HistoryFields): HistoryRecord =>
  createHistoryRecord(
    { role, instance },
    { $case: "chaosNote", value: { note: `${role} ${String(fields.publisherSeq)}` } },
    { incarnation: "run", ...fields },
    ts,
  );
const link = (role: string, instance: string, publisherSeq: number, incarnation = "run"): HistoryLink => ({ role, instance, incarnation, publisherSeq });

describe("orderHistory", () => {
  it("orders one publisher's records by its sequence, whatever their times say", () => {
    const records = [rec("kvm", "vm-1", 300, { publisherSeq: 1 }), rec("kvm", "vm-1", 100, { publisherSeq: 2 }), rec("kvm", "vm-1", 200, { publisherSeq: 3 })];
    const o = orderHistory(records);
    expect(o.order).toEqual([0, 1, 2]);
    expect(o.happenedBefore(0, 2)).toBe(true);
    expect(o.happenedBefore(2, 0)).toBe(false);
  });

  it("orders the core's records by op-log sequence across its incarnations (a standby that took over)", () => {
    const records = [
      rec("ioasid", "core", 500, { publisherSeq: 7, opSeq: 10, incarnation: "primary" }),
      rec("ioasid", "core", 100, { publisherSeq: 1, opSeq: 11, incarnation: "standby" }),
    ];
    const o = orderHistory(records);
    expect(o.order).toEqual([0, 1]);
    expect(o.happenedBefore(0, 1)).toBe(true);
  });

  it("puts a role's handling of a delivery after the core's record of the event (same seq)", () => {
    const event = createHistoryRecord(
      { role: "ioasid", instance: "core" },
      { $case: "ioasidNotify", value: { type: eventTypeOf("FREE") } },
      { seq: 42, publisherSeq: 1, incarnation: "run" },
      1000,
    );
    const handling = createHistoryRecord(
      { role: "kvm", instance: "vm-1" },
      { $case: "vmcsUpdate", value: { kind: h.VmcsUpdateKind.VMCS_UPDATE_KIND_CLEAR, gpasid: 1, hpasid: 42 } },
      { seq: 42, publisherSeq: 1, incarnation: "run" },
      10, // its host's clock is far behind
    );
    const o = orderHistory([handling, event]);
    expect(o.order).toEqual([1, 0]);
    expect(o.happenedBefore(1, 0)).toBe(true);
  });

  it("follows a causal link to the newest record of the linked publisher at or before the position", () => {
    const records = [
      rec("ioasid", "core", 1000, { publisherSeq: 1 }),
      rec("ioasid", "core", 1001, { publisherSeq: 3 }), // 2 was lost (published fire and forget)
      rec("ioasid", "core", 1002, { publisherSeq: 4 }),
      rec("vdcm", "d0", 5, { publisherSeq: 1, after: [link("ioasid", "core", 2)] }),
    ];
    const o = orderHistory(records);
    expect(o.happenedBefore(0, 3)).toBe(true);
    expect(o.happenedBefore(1, 3)).toBeUndefined(); // core's 3 is after the link's position: concurrent
    expect(o.happenedBefore(2, 3)).toBeUndefined();
  });

  it("leaves records nothing connects unordered (undefined), placed by time; and records without sequences out of happens-before", () => {
    const records = [rec("kvm", "vm-1", 200, { publisherSeq: 1 }), rec("vdcm", "d0", 100, { publisherSeq: 1 }), at(rec("iommu", "i0", 50, {}))];
    const o = orderHistory(records);
    expect(o.happenedBefore(0, 1)).toBeUndefined();
    expect(o.happenedBefore(0, 2)).toBeUndefined();
    expect(o.order).toEqual([2, 1, 0]);
    expect(o.sequenced).toBe(2);
  });

  it("orders a role instance's runs one after another when their times (one host's clock) do not overlap", () => {
    const records = [rec("vdcm", "d0", 100, { publisherSeq: 1, incarnation: "a" }), rec("vdcm", "d0", 300, { publisherSeq: 1, incarnation: "b" })];
    expect(orderHistory(records).happenedBefore(0, 1)).toBe(true);
    const overlapping = [...records, rec("vdcm", "d0", 400, { publisherSeq: 2, incarnation: "a" })];
    expect(orderHistory(overlapping).happenedBefore(0, 1)).toBeUndefined();
  });
});

describe("the checker orders by sequences and causal links, not clocks", () => {
  it("says when the history cannot give the order: records without sequences beside sequenced ones, or links in a cycle", () => {
    const history = correctHistory({ sequenced: true });
    const mixed = check([...history, ...clocksOnly(history.slice(0, 3))], correctFinalState());
    expect(mixed.notes).toContain(`3 of ${history.length + 3} records carry no publisher sequence (recorded before issue 18): those are ordered by time`);
    const cyclic = [
      rec("kvm", "vm-1", 1, { publisherSeq: 1, after: [link("vdcm", "d0", 1)] }),
      rec("vdcm", "d0", 2, { publisherSeq: 1, after: [link("kvm", "vm-1", 1)] }),
    ];
    expect(orderHistory(cyclic).cycles).toBe(1);
    expect(orderHistory(cyclic).happenedBefore(0, 1)).toBeUndefined();
    expect(check(cyclic).notes.join("\n")).toMatch(/contradict each other \(1 cycle\(s\)\)/);
    expect(check(history, correctFinalState()).notes).toEqual([]);
  });

  it("finds a correct history clean with one host's clock 5 s behind or ahead; ordered by time, the same history fails", () => {
    for (const skew of [BEHIND, AHEAD]) {
      const history = correctHistory(skew);
      const v = check(history, correctFinalState());
      expect(v.ok, renderVerdict(v)).toBe(true);
    }
    // What the sequences save it from: by time, the VDCM's and the IOMMU's teardown of a FREE
    // came 5 s before the KVM's, and the VDCM's vdev_write before the BIND it translates.
    const byTime = check(clocksOnly(correctHistory(BEHIND)), correctFinalState());
    expect(byTime.counts.S5).toBeGreaterThan(0);
    expect(byTime.counts.S4).toBeGreaterThan(0);
    // ... and 5 s ahead, an entry set after the reclaim it precedes.
    expect(check(clocksOnly(correctHistory(AHEAD)), correctFinalState()).counts.S9).toBeGreaterThan(0);
  });

  type Step = "kvm" | "vdcm" | "iommu" | "reclaim";

  /**
   * g2's IOASID 202 (bound, programmed) freed, its FREE handled in the order `steps` says: each
   * tier tears down and releases with its ack; "reclaim" is the core releasing what is left (the
   * owner's reference) and reclaiming. Each handling follows the core's position when its delivery
   * was sent; each release follows the holder's position at its ack (as the services record them).
   */
  function freeInOrder(options: BuilderOptions, steps: readonly Step[]): HistoryRecord[] {
    const b = new HistoryBuilder(undefined, undefined, options);
    const g = GUEST_2;
    openGuest(b, g, 2);
    setUp(b, g, 202, 101);
    const ids = { ioasid: 202, generation: 1, setId: g.setId };
    let seq = 0;
    b.op({ op: "free", vm: g.vm, ...ids }, () => {
      seq = b.event("FREE", { ...ids, spid: 101, refcount: 4 });
    });
    let refcount = 4;
    const put = (role: string, instance: string, purpose: string, withSeq = true) =>
      b.add(
        "ioasid",
        "core-0",
        { $case: "ioasidPut", value: { holder: { role, instance, purpose } } },
        { ...ids, refcount: --refcount, ...(withSeq ? { seq } : {}) },
      );
    for (const step of steps) {
      if (step === "kvm") {
        b.add("kvm", g.kvm, { $case: "vmcsUpdate", value: { kind: h.VmcsUpdateKind.VMCS_UPDATE_KIND_CLEAR, gpasid: 101, hpasid: 202 } }, { ...ids, seq });
        put("kvm", g.kvm, "vmcs");
      } else if (step === "vdcm") {
        b.add(
          "vdcm",
          "vdcm-0",
          { $case: "vdevClear", value: { device: "idxd0", wq: 1, mdev: g.mdev, cause: h.VdevClearCause.VDEV_CLEAR_CAUSE_FREE } },
          { ...ids, seq },
        );
        put("vdcm", "vdcm-0", "idxd0.wq1");
      } else if (step === "iommu") {
        b.add(
          "iommu",
          "iommu-0",
          { $case: "teardownPasid", value: { device: "idxd0", handle: 202n, domain: 3, domainType: "NESTED", cause: "IOASID_FREED" } },
          { ...ids, seq },
        );
        put("iommu", "iommu-0", "bind");
      } else {
        put("set-owner", "2", "alloc", false);
        b.event("RECLAIM", { ...ids, refcount: 0 });
      }
    }
    return b.records;
  }

  it("finds a correct teardown order clean across skewed hosts, and the orders a broken core makes, which time misses", () => {
    expect(check(freeInOrder(BEHIND, ["kvm", "vdcm", "iommu", "reclaim"])).ok).toBe(true);

    // The core reclaims before the IOMMU handled the FREE (its host 5 s behind: by time, long before).
    const reclaimFirst = freeInOrder(BEHIND, ["kvm", "vdcm", "reclaim", "iommu"]);
    const v = check(reclaimFirst);
    const reclaimed = "IOASID 202 generation 1 reclaimed before its teardown finished (iommu/iommu-0 teardown_pasid)";
    expect(
      v.violations.map((x) => x.message),
      renderVerdict(v),
    ).toContain(reclaimed);
    expect(v.counts.S5).toBe(1);
    // By time: the reclaim is missed (and the VDCM's clear, 5 s early, looks out of tier order).
    expect(check(clocksOnly(reclaimFirst)).violations.map((x) => x.message)).not.toContain(reclaimed);

    // The core delivers to the VDCM before the KVM acknowledged (the KVMs' host 5 s behind).
    const deviceFirst = freeInOrder({ sequenced: true, skewMs: { kvm: -5000 } }, ["vdcm", "kvm", "iommu", "reclaim"]);
    const w = check(deviceFirst);
    const outOfTier = 'IOASID 202 generation 1: "device drained/cleared" (vdcm/vdcm-0 vdev_clear) came before "KVM entry cleared" (kvm/vm-2 vmcs_update)';
    expect(
      w.violations.map((x) => x.message),
      renderVerdict(w),
    ).toEqual([outOfTier]);
    // By time: missed (and the KVM's install, 5 s early, looks as if it came before its BIND).
    const byTime = check(clocksOnly(deviceFirst)).violations.map((x) => x.message);
    expect(byTime).not.toContain(outOfTier);
    expect(byTime).toEqual([expect.stringMatching(/kvm\/vm-2 vmcs_update translated SPID 101 to IOASID 202 generation 1, which was never bound/)]);
  });

  it("finds a real chaos run's history clean with any one host's clock 5 s off; ordered by time, it is not", () => {
    // `ioasidctl chaos run --seed 7 --guests 3 --duration 20s --faults all` (kills of the core and
    // the VDCM, partitions, drops, a stopped VFIO): 357 records, every one sequenced.
    const data = (name: string) => readFileSync(new URL(`../testdata/chaos-seed-7.${name}`, import.meta.url), "utf8");
    const history = parseHistoryJsonl(data("history.jsonl"), "chaos-seed-7.history.jsonl");
    const finalState = JSON.parse(data("final-state.json")) as FinalState;
    expect(history.every((r) => r.publisherSeq !== undefined)).toBe(true);
    expect(check(history, finalState).ok).toBe(true);
    const shifted = (roles: readonly string[], ms: number) => history.map((r) => (roles.includes(r.role) ? { ...r, ts: r.ts + ms } : r));
    let byTimeFailed = 0;
    for (const roles of [["vdcm", "iommu", "vfio"], ["kvm"], ["iommu"], ["vdcm"]]) {
      for (const ms of [-5000, 5000]) {
        const v = check(shifted(roles, ms), finalState);
        expect(v.ok, `${roles.join(", ")} ${ms} ms\n${renderVerdict(v)}`).toBe(true);
        if (!check(clocksOnly(shifted(roles, ms)), finalState).ok) byTimeFailed++;
      }
    }
    expect(byTimeFailed).toBe(8); // every skew: false violations of S4, S5 or S9
  });
});

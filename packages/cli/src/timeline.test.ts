import { describe, expect, it } from "vitest";
import type { HistoryRecord } from "@ioasid/bus";
import { buildTimeline, columnOf, renderMermaid, renderTable } from "./timeline.js";
import { findPasid } from "./verdict.js";

let t = 1000;
const rec = (role: string, action: string, fields: Partial<HistoryRecord> = {}): HistoryRecord => ({ ts: t++, role, instance: "x", action, ...fields });

describe("timeline", () => {
  it("puts each step in the column of the component that did it, references in their holder's column", () => {
    expect(columnOf(rec("ioasid", "event:ALLOC", { ioasid: 201 }))).toBe("IOASID");
    expect(columnOf(rec("ioasid", "ioasid_get", { ioasid: 201, detail: "kvm/vm-1/vmcs" }))).toBe("KVM");
    expect(columnOf(rec("ioasid", "ioasid_put", { ioasid: 201, detail: "vdcm/vdcm0/idxd0.wq0" }))).toBe("VDCM");
    expect(columnOf(rec("ioasid", "ioasid_register_notifier_mm", { detail: "kvm/vm-1 mm 7 priority 3" }))).toBe("KVM");
    expect(columnOf(rec("iommu", "teardown_pasid", { ioasid: 201 }))).toBe("IOMMU");
    expect(columnOf(rec("tool", "x"))).toBeUndefined();
  });

  it("numbers the steps of one IOASID in time order with the reference count where it changed", () => {
    const records = [
      rec("ioasid", "event:ALLOC", { ioasid: 201, refcount: 1 }),
      rec("ioasid", "ioasid_get", { ioasid: 201, refcount: 2, detail: "iommu/dmar0/bind" }),
      rec("iommu", "bind_gpasid", { ioasid: 201 }),
      rec("ioasid", "event:BIND", { ioasid: 201, spid: 101, refcount: 2 }),
      rec("ioasid", "event:ALLOC", { ioasid: 999, refcount: 1 }),
      rec("ioasid", "event:SET_ALLOC", { setId: 1 }),
    ];
    const rows = buildTimeline([...records].reverse(), { ioasids: new Set([201]), setIds: new Set([1]) });
    expect(rows.map((r) => [r.step, r.column, r.ref])).toEqual([
      [1, "IOASID", 1],
      [2, "IOMMU", 2],
      [3, "IOMMU", undefined],
      [4, "IOASID", undefined],
    ]);
    const table = renderTable(rows, { width: 24 });
    expect(table.split("\n")[0]).toMatch(/VFIO\s+IOMMU\s+KVM\s+VDCM\s+IOASID\s+Ref/);
    expect(table).toContain("ioasid_notify(BIND) spid 101");
    const mermaid = renderMermaid(rows);
    expect(mermaid.startsWith("sequenceDiagram")).toBe(true);
    expect(mermaid).toContain("IOMMU->>IOASID: 2. -> ioasid_get(201) [ref 2]");
  });
});

describe("findPasid", () => {
  it("finds a PASID anywhere in a query answer", () => {
    expect(findPasid({ vms: [{ translations: [{ gpasid: 101, hpasid: 201 }] }] }, 201)).toEqual(["$.vms[0].translations[0]"]);
    expect(findPasid({ devices: [{ entries: [] }] }, 201)).toEqual([]);
  });
});

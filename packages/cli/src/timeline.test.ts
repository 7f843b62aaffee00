import { describe, expect, it } from "vitest";
import type { HistoryRecord } from "@ioasid/bus";
import { buildTimeline, columnOf, FAULT_ACTIONS, renderMermaid, renderTable } from "./timeline.js";
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

describe("timeline of IO page faults", () => {
  // The records the IOMMU and VFIO write on the fault path, as they write them.
  const faultRecords = () => [
    rec("iommu", "iopf_group", { ioasid: 201, spid: 101, setId: 1, detail: "group 7 device idxd0 prgi 3: 2 request(s) → vfio/vfio-1" }),
    rec("vfio", "iopf_relay", { ioasid: 201, spid: 101, detail: "container 1 group 7: 2 request(s)" }),
    rec("iommu", "page_response", { ioasid: 201, spid: 101, setId: 1, detail: "group 7 device idxd0 prgi 3: SUCCESS (HANDLER)" }),
    rec("vfio", "page_response", { detail: "container 1 group 7: SUCCESS" }),
    rec("iommu", "dma_fault", { ioasid: 201, detail: "device idxd0 0x500000 NOT_PRESENT: reported to vfio/vfio-1" }),
    rec("vfio", "dma_fault", { ioasid: 201, spid: 101, detail: "container 1 FAULT_REASON_NOT_PRESENT 0x500000" }),
    rec("vfio", "iopf_no_handler", { ioasid: 201, spid: 101, detail: "group 8: no WatchFaults, answered FAILURE" }),
    rec("iommu", "iopf_credits_exhausted", { ioasid: 201, detail: "device idxd0 0x600000: no page-request credit left, group 9 answered INVALID" }),
    rec("vfio", "fault_session_lost", { detail: "container 1: 2 group(s) answered INVALID" }),
  ];

  it("shows every fault step with its details, in the column of the role that did it", () => {
    const rows = buildTimeline(faultRecords(), { ioasids: new Set([201]) });
    expect(rows.map((r) => r.record.action)).toEqual(faultRecords().map((r) => r.action));
    expect(new Set(rows.map((r) => r.record.action))).toEqual(FAULT_ACTIONS);
    expect(rows.map((r) => r.column)).toEqual(["IOMMU", "VFIO", "IOMMU", "VFIO", "IOMMU", "VFIO", "VFIO", "IOMMU", "VFIO"]);
    expect(rows[0]!.text).toBe("iopf_group(201, gpasid 101) group 7 device idxd0 prgi 3: 2 request(s) → vfio/vfio-1");
    expect(rows[3]!.text).toBe("page_response() container 1 group 7: SUCCESS");
    const table = renderTable(rows);
    for (const r of faultRecords()) expect(table).toContain(r.detail);
  });

  it("draws the hand-offs between the IOMMU and VFIO as arrows in the Mermaid diagram", async () => {
    const mermaid = renderMermaid(buildTimeline(faultRecords()));
    expect(mermaid).toContain("IOMMU->>VFIO: 1. iopf_group(201, gpasid 101) group 7");
    expect(mermaid).toContain("Note over VFIO: 2. iopf_relay(201, gpasid 101) container 1 group 7: 2 request(s)");
    expect(mermaid).toContain("Note over IOMMU: 3. page_response(201, gpasid 101) group 7 device idxd0 prgi 3: SUCCESS (HANDLER)");
    expect(mermaid).toContain("VFIO->>IOMMU: 4. page_response() container 1 group 7: SUCCESS");
    expect(mermaid).toContain("IOMMU->>VFIO: 5. dma_fault(201) device idxd0 0x500000 NOT_PRESENT: reported to vfio/vfio-1");
    expect(mermaid).toContain("Note over IOMMU: 8. iopf_credits_exhausted(201)");
    expect(mermaid).toContain("Note over VFIO: 9. fault_session_lost() container 1: 2 group(s) answered INVALID");
    // The HTML page renders it with Mermaid: the diagram must parse.
    const { default: mermaidJs } = await import("mermaid");
    await expect(mermaidJs.parse(mermaid)).resolves.toMatchObject({ diagramType: "sequence" });
  });
});

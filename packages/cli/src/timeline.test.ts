import { describe, expect, it } from "vitest";
import { createHistoryRecord, describeAction, eventTypeOf, type HistoryActionInput, type HistoryRecord } from "@ioasid/bus";
import { buildTimeline, columnOf, FAULT_ACTIONS, renderMermaid, renderTable } from "./timeline.js";
import { findPasid } from "./verdict.js";

let t = 1000;
/** A record of `role`: an action of the catalogue, or a core event ("event:ALLOC"). */
const rec = (role: string, action: HistoryActionInput | `event:${string}`, fields: Partial<HistoryRecord> = {}): HistoryRecord =>
  createHistoryRecord(
    { role, instance: "x" },
    typeof action === "string" ? { $case: "ioasidNotify", value: { type: eventTypeOf(action.slice(6)) } } : action,
    fields,
    t++,
  );
/** An ioasid_get / ioasid_put by `holder` ("kvm/vm-1/vmcs"). */
const ref = (kind: "get" | "put", holder: string): HistoryActionInput => {
  const [role = "", instance = "", purpose = ""] = holder.split("/");
  const value = { holder: { role, instance, purpose } };
  return kind === "get" ? { $case: "ioasidGet", value } : { $case: "ioasidPut", value };
};

describe("timeline", () => {
  it("puts each step in the column of the component that did it, references in their holder's column", () => {
    expect(columnOf(rec("ioasid", "event:ALLOC", { ioasid: 201 }))).toBe("IOASID");
    expect(columnOf(rec("ioasid", ref("get", "kvm/vm-1/vmcs"), { ioasid: 201 }))).toBe("KVM");
    expect(columnOf(rec("ioasid", ref("put", "vdcm/vdcm0/idxd0.wq0"), { ioasid: 201 }))).toBe("VDCM");
    expect(
      columnOf(
        rec("ioasid", {
          $case: "ioasidRegisterNotifierMm",
          value: { subscriber: "kvm", instance: "vm-1", scope: { $case: "mmToken", value: 7n }, priority: 3 },
        }),
      ),
    ).toBe("KVM");
    expect(columnOf(rec("iommu", { $case: "teardownPasid", value: {} }, { ioasid: 201 }))).toBe("IOMMU");
    expect(columnOf(rec("tool", { $case: "chaosNote", value: { note: "x" } }))).toBeUndefined();
  });

  it("numbers the steps of one IOASID in time order with the reference count where it changed", () => {
    const records = [
      rec("ioasid", "event:ALLOC", { ioasid: 201, refcount: 1 }),
      rec("ioasid", ref("get", "iommu/dmar0/bind"), { ioasid: 201, refcount: 2 }),
      rec("iommu", { $case: "bindGpasid", value: { device: "idxd0", handle: 1n } }, { ioasid: 201 }),
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
    rec(
      "iommu",
      { $case: "iopfGroup", value: { group: 7n, device: "idxd0", prgi: 3, requests: 2, owner: "vfio/vfio-1" } },
      { ioasid: 201, spid: 101, setId: 1 },
    ),
    rec("vfio", { $case: "iopfRelay", value: { container: 1, group: 7n, requests: 2 } }, { ioasid: 201, spid: 101 }),
    rec(
      "iommu",
      { $case: "pageResponse", value: { group: 7n, device: "idxd0", prgi: 3, code: "SUCCESS", source: "HANDLER" } },
      { ioasid: 201, spid: 101, setId: 1 },
    ),
    rec("vfio", { $case: "pageResponse", value: { container: 1, group: 7n, code: "SUCCESS" } }),
    rec("iommu", { $case: "dmaFault", value: { device: "idxd0", address: 0x500000n, reason: "NOT_PRESENT", reportedTo: "vfio/vfio-1" } }, { ioasid: 201 }),
    rec("vfio", { $case: "dmaFault", value: { container: 1, reason: "FAULT_REASON_NOT_PRESENT", address: 0x500000n } }, { ioasid: 201, spid: 101 }),
    rec("vfio", { $case: "iopfNoHandler", value: { group: 8n, why: "no WatchFaults" } }, { ioasid: 201, spid: 101 }),
    rec("iommu", { $case: "iopfCreditsExhausted", value: { device: "idxd0", address: 0x600000n, answeredGroup: 9n } }, { ioasid: 201 }),
    rec("vfio", { $case: "faultSessionLost", value: { container: 1, group: 10n } }),
  ];

  it("shows every fault step with its details, in the column of the role that did it", () => {
    const rows = buildTimeline(faultRecords(), { ioasids: new Set([201]) });
    expect(rows.map((r) => r.record.action)).toEqual(faultRecords().map((r) => r.action));
    expect(new Set(rows.map((r) => r.record.action?.$case))).toEqual(FAULT_ACTIONS);
    expect(rows.map((r) => r.column)).toEqual(["IOMMU", "VFIO", "IOMMU", "VFIO", "IOMMU", "VFIO", "VFIO", "IOMMU", "VFIO"]);
    expect(rows[0]!.text).toBe("iopf_group(201, gpasid 101) group 7 device idxd0 prgi 3: 2 request(s) → vfio/vfio-1");
    expect(rows[3]!.text).toBe("page_response() container 1 group 7: SUCCESS");
    const table = renderTable(rows);
    for (const r of faultRecords()) expect(table).toContain(describeAction(r));
    expect(table).toContain("device idxd0 0x600000: no page-request credit left, group 9 answered INVALID");
  });

  it("draws the hand-offs between the IOMMU and VFIO as arrows in the Mermaid diagram", async () => {
    const mermaid = renderMermaid(buildTimeline(faultRecords()));
    expect(mermaid).toContain("IOMMU->>VFIO: 1. iopf_group(201, gpasid 101) group 7");
    expect(mermaid).toContain("Note over VFIO: 2. iopf_relay(201, gpasid 101) container 1 group 7: 2 request(s)");
    expect(mermaid).toContain("Note over IOMMU: 3. page_response(201, gpasid 101) group 7 device idxd0 prgi 3: SUCCESS (HANDLER)");
    expect(mermaid).toContain("VFIO->>IOMMU: 4. page_response() container 1 group 7: SUCCESS");
    expect(mermaid).toContain("IOMMU->>VFIO: 5. dma_fault(201) device idxd0 0x500000 NOT_PRESENT: reported to vfio/vfio-1");
    expect(mermaid).toContain("Note over IOMMU: 8. iopf_credits_exhausted(201)");
    expect(mermaid).toContain("Note over VFIO: 9. fault_session_lost() container 1 group 10: the VMM went away, answered INVALID");
    // The HTML page renders it with Mermaid: the diagram must parse.
    const { default: mermaidJs } = await import("mermaid");
    await expect(mermaidJs.parse(mermaid)).resolves.toMatchObject({ diagramType: "sequence" });
  });
});

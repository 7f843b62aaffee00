import { describe, expect, it } from "vitest";
import { createHistoryRecord, describeAction, eventTypeOf, type HistoryActionInput, type HistoryRecord } from "@ioasid/bus";
import { history } from "@ioasid/proto";
import { wrapText } from "./text-wrap.js";
import { buildTimeline, COLUMNS, columnOf, describeStep, FAULT_ACTIONS, renderTable } from "./timeline.js";
import { renderMermaid } from "./timeline-diagram.js";
import { findPasid } from "./verdict.js";

/** A diagram's lines, trimmed, each label unwrapped (its `<br/>` read as a space). */
const diagramLines = (mermaid: string) => mermaid.split("\n").map((l) => l.trim().replace(/<br\/>/g, " "));
/** A column table's steps, each as one line again (its wrapped parts joined with a space). */
function unwrapTable(table: string): string {
  const steps: string[] = [];
  for (const line of table.split("\n").slice(2)) {
    const text = line
      .slice(5)
      .trim()
      .replace(/\s{2,}\d+$/, "");
    if (/^\s*\d+ {2}/.test(line)) steps.push(text);
    else steps[steps.length - 1] += ` ${text}`;
  }
  return steps.join("\n");
}

let t = 1000;
/** A record of `role` (instance "x", or the one of "kvm@vm-2"): an action of the catalogue, or a core event ("event:ALLOC"). */
const rec = (who: string, action: HistoryActionInput | `event:${string}`, fields: Partial<HistoryRecord> = {}): HistoryRecord =>
  createHistoryRecord(
    { role: who.split("@")[0]!, instance: who.split("@")[1] ?? "x" },
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
    expect(unwrapTable(table)).toContain("ioasid_notify(BIND) spid 101");
    const mermaid = renderMermaid(rows);
    expect(mermaid.startsWith("sequenceDiagram")).toBe(true);
    expect(mermaid).toContain("iommu->>core: ioasid_get(201) bind");
  });

  it("wraps a long step within its own column, so that no line runs into the next column", () => {
    const records = [
      rec(
        "vfio",
        { $case: "containerOpen", value: { container: 2, mmToken: 1796515764522224n, quota: 16, vmName: "crash-661ebebfa4cf0", graceMs: 10000 } },
        { setId: 2 },
      ),
      rec("ioasid", "event:ALLOC", { ioasid: 201, refcount: 1 }),
      rec("vdcm", { $case: "vdevClear", value: { device: "idxd0", wq: 0, mdev: "mdev-661ebebfa4cf0-0123456789abcdef" } }, { ioasid: 201 }),
      rec("ioasid", ref("put", "vdcm/vdcm0/idxd0.wq0"), { ioasid: 201, refcount: 0 }),
    ];
    const rows = buildTimeline(records);
    const width = 22;
    const lines = renderTable(rows, { width }).split("\n").slice(2);
    expect(lines.length).toBeGreaterThan(rows.length); // some steps took several lines
    const refAt = 5 + COLUMNS.length * width;
    let row = -1;
    for (const line of lines) {
      if (/^\s*\d+ {2}/.test(line)) row++;
      const r = rows[row]!;
      const from = 5 + COLUMNS.indexOf(r.column) * width;
      // Nothing outside the step number, the row's own column (less its one-space gap) and the Ref column.
      const outside = line.slice(5, from) + line.slice(from + width - 1, refAt);
      expect(outside.trim(), line).toBe("");
      expect(line.length).toBeLessThanOrEqual(refAt + 3);
    }
    // Every word is still there, and the reference count stays at the right of the step's first line.
    const table = renderTable(rows, { width });
    for (const word of describeStep(records[0]!).split(" ")) if (word.length < width) expect(table).toContain(word);
    expect(lines.find((l) => /^ {2}4 /.test(l))!.slice(refAt)).toBe("0");
  });
});

describe("wrapText", () => {
  it("breaks at spaces, and inside a word only when the word is longer than a line", () => {
    expect(wrapText("vmcs_update(1) clear gpasid 101 → hpasid 1", 20)).toEqual(["vmcs_update(1) clear", "gpasid 101 → hpasid", "1"]);
    expect(wrapText("ioasid_register_notifier_mm()", 21)).toEqual(["ioasid_register_", "notifier_mm()"]);
    expect(wrapText("0123456789abcdef0123", 8)).toEqual(["01234567", "89abcdef", "0123"]);
    expect(wrapText("", 5)).toEqual([""]);
    for (const l of wrapText("container_open() container 2 mm_token 1796515764522224 quota 16 hpa 0x100000000+0x40000000", 12))
      expect(l.length).toBeLessThanOrEqual(12);
  });
});

describe("timeline as a sequence diagram", () => {
  // A guest's FREE before unbind, as the services record it (the crash scenario, DESIGN §6): the
  // core's FREE (seq 13), each tier's teardown carrying seq 13, and the core's record of the
  // reference each acknowledgement released.
  const freeRecords = () => [
    rec("ioasid@core", "event:ALLOC", { ioasid: 1, generation: 3, setId: 2, refcount: 1, seq: 11 }),
    rec("ioasid@core", ref("get", "iommu/dmar0/bind"), { ioasid: 1, generation: 3, setId: 2, refcount: 2 }),
    rec("ioasid@core", "event:BIND", { ioasid: 1, generation: 3, setId: 2, spid: 101, refcount: 2, seq: 12 }),
    rec("ioasid@core", ref("get", "kvm/vm-2/vmcs"), { ioasid: 1, generation: 3, setId: 2, refcount: 3 }),
    rec(
      "kvm@vm-2",
      { $case: "vmcsUpdate", value: { kind: history.VmcsUpdateKind.VMCS_UPDATE_KIND_INSTALL, gpasid: 101, hpasid: 1 } },
      { ioasid: 1, generation: 3, setId: 2, seq: 12 },
    ),
    rec("ioasid@core", ref("get", "vdcm/vdcm0/idxd0.wq0"), { ioasid: 1, generation: 3, setId: 2, refcount: 4 }),
    rec("ioasid@core", "event:FREE", { ioasid: 1, generation: 3, setId: 2, spid: 101, refcount: 3, seq: 13 }),
    rec(
      "kvm@vm-2",
      {
        $case: "vmcsUpdate",
        value: { kind: history.VmcsUpdateKind.VMCS_UPDATE_KIND_CLEAR, gpasid: 101, hpasid: 1, cause: history.VmcsClearCause.VMCS_CLEAR_CAUSE_FREE },
      },
      { ioasid: 1, generation: 3, setId: 2, seq: 13 },
    ),
    rec("ioasid@core", ref("put", "kvm/vm-2/vmcs"), { ioasid: 1, generation: 3, setId: 2, refcount: 2, seq: 13 }),
    rec("vdcm@vdcm0", { $case: "vdevClear", value: { device: "idxd0", wq: 0, mdev: "m1" } }, { ioasid: 1, generation: 3, setId: 2, seq: 13 }),
    rec("ioasid@core", ref("put", "vdcm/vdcm0/idxd0.wq0"), { ioasid: 1, generation: 3, setId: 2, refcount: 1, seq: 13 }),
    rec("iommu@dmar0", { $case: "teardownPasid", value: { device: "idxd0", handle: 2n, domain: 4 } }, { ioasid: 1, generation: 3, setId: 2, seq: 13 }),
    rec("iommu@dmar0", { $case: "iotlbFlush", value: { scope: "PASID", domain: 4, device: "idxd0" } }, { ioasid: 1, seq: 13 }),
    rec("ioasid@core", ref("put", "iommu/dmar0/bind"), { ioasid: 1, generation: 3, setId: 2, refcount: 0, seq: 13 }),
    rec("ioasid@core", "event:RECLAIM", { ioasid: 1, generation: 3, setId: 2, refcount: 0, seq: 14 }),
    // VFIO records the virtual command once the core answered: drawn before the FREE it caused.
    rec("vfio", { $case: "vcmdFree", value: { container: 2, outcome: "FREE_PENDING" } }, { ioasid: 1, generation: 3, setId: 2 }),
  ];
  const lines = () => diagramLines(renderMermaid(buildTimeline(freeRecords())));
  const at = (ls: string[], line: string) => {
    const i = ls.indexOf(line);
    expect(i, `${line} in\n${ls.join("\n")}`).toBeGreaterThanOrEqual(0);
    return i;
  };

  it("draws each delivery of the FREE and its acknowledgement, the tiers in order CPU → device → IOMMU", () => {
    const ls = lines();
    // The tiers are lanes in delivery order, after the core.
    const lanes = ls.filter((l) => l.startsWith("participant ")).map((l) => l.split(" ")[1]);
    expect(lanes).toEqual(["vfio", "core", "kvm", "vdcm", "iommu", "ioasid1"]);
    const order = [
      at(ls, "vfio->>core: ioasid_free(1) for container 2: FREE_PENDING"),
      at(ls, "Note over ioasid1: FREE seq 13 · FREE_PENDING · ref 3"),
      at(ls, "core->>kvm: FREE seq 13"),
      at(ls, "kvm-->>core: ack seq 13 · ioasid_put(vmcs)"),
      at(ls, "core->>vdcm: FREE seq 13"),
      at(ls, "vdcm-->>core: ack seq 13 · ioasid_put(idxd0.wq0)"),
      at(ls, "core->>iommu: FREE seq 13"),
      at(ls, "iommu-->>core: ack seq 13 · ioasid_put(bind)"),
      at(ls, "Note over ioasid1: RECLAIM seq 14 · reclaimed, free again"),
    ];
    expect(order).toEqual([...order].sort((a, b) => a - b));
    // What each tier did for the FREE lies between its delivery and its ack.
    const kvmStep = ls.findIndex((l) => l.startsWith("kvm->>kvm: vmcs_update(1)") && l.includes("(FREE)"));
    expect(kvmStep).toBeGreaterThan(order[2]!);
    expect(kvmStep).toBeLessThan(order[3]!);
    const iommuStep = ls.findIndex((l) => l.startsWith("iommu->>iommu: teardown_pasid(1)"));
    expect(iommuStep).toBeGreaterThan(order[6]!);
    expect(ls[iommuStep]).toMatch(/teardown_pasid\(1\).* iotlb_flush\(1\)/); // the IOMMU's steps for it, gathered in one arrow
    // The BIND's delivery to KVM: KVM's reference taken for it and its VMCS entry, then its ack.
    const bind = at(ls, "core->>kvm: BIND seq 12");
    expect(at(ls, "kvm->>core: ioasid_get(1) vmcs")).toBe(bind + 1);
    expect(at(ls, "kvm-->>core: ack seq 12")).toBeGreaterThan(bind);
    // An ack that released a reference is drawn once, as the ack.
    expect(ls.filter((l) => l.includes("ioasid_put(1)"))).toEqual([]);
  });

  it("draws a state and reference-count band on the IOASID's lane, and far fewer notes than steps", () => {
    const ls = lines();
    const band = ls.filter((l) => l.startsWith("Note over "));
    expect(band.every((l) => l.startsWith("Note over ioasid1: "))).toBe(true);
    expect(band.map((l) => l.slice("Note over ioasid1: ".length))).toEqual([
      "ALLOC seq 11 · gen 3 · ACTIVE · ref 1",
      "ref 2",
      "BIND seq 12 spid 101",
      "ref 3",
      "ref 4",
      "FREE seq 13 · FREE_PENDING · ref 3",
      "ref 2",
      "ref 1",
      "ref 0",
      "RECLAIM seq 14 · reclaimed, free again",
    ]);
    // The lane is active while the IOASID is, with a second bar while FREE_PENDING, both ended at the reclaim.
    expect(ls.filter((l) => l === "activate ioasid1")).toHaveLength(2);
    expect(ls.filter((l) => l === "deactivate ioasid1")).toHaveLength(2);
    expect(at(ls, "deactivate ioasid1")).toBeLessThan(at(ls, "Note over ioasid1: RECLAIM seq 14 · reclaimed, free again"));
    // And a background band across the lanes: ACTIVE, then FREE_PENDING, closed.
    const rects = ls.filter((l) => l.startsWith("rect ") || l === "end");
    expect(rects).toEqual([expect.stringMatching(/^rect rgba/), "end", expect.stringMatching(/^rect rgba/), "end"]);
  });

  it("renders as a sequence diagram Mermaid parses", async () => {
    const { default: mermaidJs } = await import("mermaid");
    await expect(mermaidJs.parse(renderMermaid(buildTimeline(freeRecords())))).resolves.toMatchObject({ diagramType: "sequence" });
  });

  it("draws a subscriber passed over at its deadline as a crossed arrow", () => {
    const rows = buildTimeline([
      rec("ioasid", "event:FREE", { ioasid: 7, refcount: 2, seq: 40 }),
      rec("ioasid", { $case: "deliveryMissed", value: { subscriber: "vdcm", instance: "vdcm0", type: eventTypeOf("FREE") } }, { ioasid: 7, seq: 40 }),
    ]);
    expect(diagramLines(renderMermaid(rows))).toContain("core-xvdcm: FREE seq 40 to vdcm0: missed, no ack by the deadline");
  });
});

describe("timeline of acknowledgements the core recorded", () => {
  it("draws a delivery to a subscriber that had nothing to do (only the core's delivery_acked shows it), in tier order, and leaves it out of the table", () => {
    const acked = (subscriber: string, instance: string, releases: string[] = []) =>
      rec("ioasid", { $case: "deliveryAcked", value: { subscriber, instance, type: eventTypeOf("FREE"), releases, late: false } }, { ioasid: 7, seq: 40 });
    const rows = buildTimeline([
      rec("ioasid", "event:FREE", { ioasid: 7, refcount: 1, seq: 40 }),
      acked("kvm", "vm-1"),
      acked("vdcm", "vdcm0"),
      acked("iommu", "dmar0", ["bind"]),
      rec("ioasid", { $case: "ioasidPut", value: { holder: { role: "iommu", instance: "dmar0", purpose: "bind" } } }, { ioasid: 7, refcount: 0, seq: 40 }),
      rec("ioasid", "event:RECLAIM", { ioasid: 7, seq: 41 }),
    ]);
    const ls = diagramLines(renderMermaid(rows));
    const order = ["core->>kvm: FREE seq 40", "kvm-->>core: ack seq 40", "core->>vdcm: FREE seq 40", "vdcm-->>core: ack seq 40", "core->>iommu: FREE seq 40"];
    const at = order.map((l) => ls.indexOf(l));
    expect(at.every((i) => i >= 0)).toBe(true);
    expect([...at].sort((a, b) => a - b)).toEqual(at);
    // The IOMMU's ack is drawn once, at the reference it released, before the reclaim.
    expect(ls.filter((l) => l.startsWith("iommu-->>core:"))).toEqual(["iommu-->>core: ack seq 40 · ioasid_put(bind)"]);
    expect(ls.indexOf("iommu-->>core: ack seq 40 · ioasid_put(bind)")).toBeLessThan(ls.findIndex((l) => l.includes("RECLAIM seq 41")));
    // The table: the document's steps only, numbered without gaps.
    const table = renderTable(rows).split("\n").slice(2);
    expect(table.map((l) => l.slice(0, 3).trim()).filter((n) => n !== "")).toEqual(["1", "2", "3"]);
    expect(renderTable(rows)).not.toContain("delivery_acked");
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
    // Wrapped in their columns, with nothing lost (a word cut in two is joined again without spaces).
    const table = unwrapTable(renderTable(rows)).replace(/\s/g, "");
    for (const r of faultRecords()) expect(table).toContain(describeAction(r)!.replace(/\s/g, ""));
  });

  it("draws the hand-offs IOMMU → VFIO → guest and the guest's answer back as arrows", async () => {
    const mermaid = renderMermaid(buildTimeline(faultRecords()));
    const ls = diagramLines(mermaid);
    expect(ls.filter((l) => l.startsWith("participant ")).map((l) => l.split(" ")[1])).toEqual(["guest", "vfio", "core", "kvm", "vdcm", "iommu", "ioasid201"]);
    const order = [
      ls.findIndex((l) => l.startsWith("iommu->>vfio: page requests (201, gpasid 101): group 7, 2 request(s)")),
      ls.indexOf("vfio->>guest: IO page fault group 7: 2 request(s) on gpasid 101"),
      // The guest's answer, which VFIO records after the IOMMU applied it, is drawn before it.
      ls.indexOf("guest->>vfio: page response group 7: SUCCESS"),
      ls.indexOf("vfio->>iommu: page_response() container 1 group 7: SUCCESS"),
      ls.findIndex((l) => l.startsWith("iommu->>iommu: page_response(201, gpasid 101) group 7")),
      ls.indexOf("iommu->>vfio: DMA fault (201) device idxd0 0x500000 NOT_PRESENT"),
      ls.indexOf("vfio->>guest: DMA fault FAULT_REASON_NOT_PRESENT 0x500000"),
    ];
    expect(
      order.every((i) => i >= 0),
      mermaid,
    ).toBe(true);
    expect(order).toEqual([...order].sort((a, b) => a - b));
    expect(ls.find((l) => l.startsWith("vfio->>iommu: iopf_no_handler(201, gpasid 101)"))).toBeDefined();
    expect(ls.find((l) => l.startsWith("vfio->>iommu: fault_session_lost()"))).toContain("answered INVALID");
    expect(ls.find((l) => l.startsWith("iommu->>iommu: iopf_credits_exhausted(201)"))).toBeDefined();
    // The HTML page renders it with Mermaid: the diagram must parse.
    const { default: mermaidJs } = await import("mermaid");
    await expect(mermaidJs.parse(mermaid)).resolves.toMatchObject({ diagramType: "sequence" });
  });
});

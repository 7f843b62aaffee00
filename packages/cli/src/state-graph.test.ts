import { describe, expect, it } from "vitest";
import { core, iommu, kvm, vdcm, vfio } from "@ioasid/proto";
import { describeOwnerData, inspectJson, renderInspectText, type InspectSnapshot } from "./inspect.js";
import { buildStateGraph, renderStateHtml, renderStateMermaid, renderStateSvg } from "./state-graph.js";

const holder = (role: string, instance: string, purpose: string, count = 1) => ({ holder: { role, instance, purpose }, count });
const ownerData = Buffer.from(JSON.stringify({ containerId: 1, device: { kind: "mdev", id: "mdev1" } }));

/** A stack's state as `inspect` gets it: one VM with IOASID 1 bound and programmed, IOASID 2 allocated only. */
function snapshot(): InspectSnapshot {
  return {
    core: {
      stats: core.GetStatsResponse.fromPartial({ capacity: 1 << 20, inUse: 2 }),
      sets: [core.IoasidSet.fromPartial({ setId: 1, token: 4242n, quota: 64, inUse: 2 })],
      ioasids: [
        core.IoasidInfo.fromPartial({
          ioasid: 1,
          setId: 1,
          generation: 1,
          state: core.IoasidState.IOASID_STATE_ACTIVE,
          spid: 101,
          refcount: 4,
          holders: [
            holder("set-owner", "set-1", "allocation"),
            holder("iommu", "dmar0", "bind"),
            holder("kvm", "vm-1", "vmcs"),
            holder("vdcm", "vdcm0", "idxd0.wq0"),
          ],
        }),
        core.IoasidInfo.fromPartial({
          ioasid: 2,
          setId: 1,
          generation: 1,
          state: core.IoasidState.IOASID_STATE_FREE_PENDING,
          refcount: 1,
          holders: [holder("vdcm", "vdcm0", "idxd0.wq1")],
        }),
      ],
      registrations: [],
    },
    vfio: vfio.QueryStateResponse.fromPartial({ containers: [{ containerId: 1, setId: 1, vmName: "vm1" }] }),
    kvm: kvm.QueryStateResponse.fromPartial({ vms: [{ vmId: 1, vmName: "vm1", setId: 1, translations: [{ gpasid: 101, hpasid: 1, generation: 1 }] }] }),
    vdcm: vdcm.QueryStateResponse.fromPartial({
      devices: [
        {
          deviceId: "idxd0",
          pasidEntries: [
            { hpasid: 1, generation: 1, gpasid: 101, setId: 1, wqId: 0 },
            // Programmed, but VDCM's reference for it is not held: a wrong entry, drawn as such.
            { hpasid: 2, generation: 1, setId: 1, wqId: 3 },
          ],
        },
      ],
    }),
    iommu: iommu.QueryStateResponse.fromPartial({
      devices: [
        {
          deviceId: "0000:6a:01.0",
          pasidEntries: [
            { pasid: 0, withoutPasid: true, domainId: 1, domainType: iommu.DomainType.DOMAIN_TYPE_PAGING, handleId: 9n },
            { pasid: 1, domainId: 2, domainType: iommu.DomainType.DOMAIN_TYPE_NESTED, handleId: 1n, setId: 1, gpasid: 101, generation: 1 },
            // A PASID the core no longer has (S9): drawn as wrong, under an IOASID "not allocated".
            { pasid: 7, domainId: 2, domainType: iommu.DomainType.DOMAIN_TYPE_NESTED, handleId: 4n, setId: 1, gpasid: 107 },
          ],
        },
      ],
      attachHandles: [{ handleId: 1n, deviceId: "0000:6a:01.0", pasid: 1, domainId: 2, owner: "vfio/vfio-1", ownerData, setId: 1, gpasid: 101 }],
    }),
    unreachable: {},
  };
}

/** The `<g class="node">` elements of an SVG: kind, id, tone and text. */
function svgNodes(svg: string) {
  return [...svg.matchAll(/<g class="node" data-kind="(\w+)" data-id="(\w+)" data-tone="(\w+)">(.*?)<\/g>/g)].map((m) => ({
    kind: m[1],
    id: m[2],
    tone: m[3],
    text: [...m[4]!.matchAll(/<text[^>]*>(.*?)<\/text>/g)].map((t) => t[1]).join(" "),
  }));
}

/**
 * The flowchart's grammar, line by line (Mermaid's flowchart parser needs a DOM, which the unit
 * tests have not): a header, node declarations with quoted labels, links between declared nodes,
 * class definitions and assignments to declared nodes.
 */
function checkFlowchart(text: string): { nodes: string[]; edges: string[] } {
  const [header, ...lines] = text.split("\n");
  expect(header).toBe("flowchart LR");
  const nodes: string[] = [];
  const edges: string[] = [];
  const declared = new Set<string>();
  for (const line of lines) {
    let m: RegExpExecArray | null;
    if ((m = /^ {4}(\w+)\["([^"]*)"\]$/.exec(line)) !== null) {
      declared.add(m[1]!);
      if (!m[1]!.startsWith("down_")) nodes.push(m[1]!);
    } else if ((m = /^ {4}(\w+) --> (\w+)$/.exec(line)) !== null) {
      expect(declared.has(m[1]!) && declared.has(m[2]!), line).toBe(true);
      edges.push(line.trim());
    } else if ((m = /^ {4}class ([\w,]+) (\w+)$/.exec(line)) !== null) {
      for (const id of m[1]!.split(",")) expect(declared.has(id), line).toBe(true);
    } else expect(line).toMatch(/^ {4}classDef \w+ fill:#[0-9a-f]{6},stroke:#[0-9a-f]{6}$/);
  }
  return { nodes, edges };
}

describe("the state picture (inspect --html, --mermaid)", () => {
  it("draws sets → IOASIDs → holders → hardware entries, each entry under the holder whose reference it is", () => {
    const g = buildStateGraph(snapshot());
    const parentOf = (text: string) => {
      const n = g.nodes.find((x) => x.lines.join(" ").includes(text));
      expect(n, text).toBeDefined();
      return g.nodes.find((x) => x.id === n!.parent)?.lines.join(" ");
    };
    expect(parentOf("IOASID 1 · gen 1")).toMatch(/^set 1/);
    expect(parentOf("kvm/vm-1 vmcs")).toMatch(/^IOASID 1 /);
    expect(parentOf("KVM VMCS · vm 1 (vm1) gpasid 101 → hpasid 1")).toBe("kvm/vm-1 vmcs");
    expect(parentOf("VDCM idxd0 wq 0 hpasid 1")).toBe("vdcm/vdcm0 idxd0.wq0");
    expect(parentOf("IOMMU 0000:6a:01.0 PASID 1 NESTED domain 2")).toBe("iommu/dmar0 bind");
    // What no reference accounts for hangs from its IOASID, drawn wrong; the RID_PASID entry is no IOASID's.
    expect(g.nodes.find((n) => n.lines[0] === "VDCM idxd0 wq 3")).toMatchObject({ tone: "bad", parent: "ioasid2" });
    expect(g.nodes.find((n) => n.lines[0] === "IOMMU 0000:6a:01.0 PASID 7")).toMatchObject({ tone: "bad", parent: "ioasid7" });
    expect(g.nodes.find((n) => n.id === "ioasid7")).toMatchObject({ kind: "ioasid", tone: "bad", lines: ["IOASID 7", "not allocated: S9"] });
    expect(g.nodes.some((n) => n.lines.join(" ").includes("PASID 0"))).toBe(false);
    expect(g.nodes.find((n) => n.id === "ioasid2")!.tone).toBe("pending");
  });

  it("renders an SVG with a box for each set, IOASID, holder and hardware entry, and an edge for each link", () => {
    const g = buildStateGraph(snapshot());
    const svg = renderStateSvg(g);
    expect(svg).toMatch(/^<svg xmlns="http:\/\/www.w3.org\/2000\/svg" width="\d+" height="\d+"/);
    const nodes = svgNodes(svg);
    expect(nodes.map((n) => n.kind).sort()).toEqual(
      [...Array(2).fill("ioasid"), "ioasid", ...Array(5).fill("holder"), ...Array(5).fill("entry"), "set"].sort(), // IOASIDs 1, 2 and the unallocated 7
    );
    expect(nodes.find((n) => n.id === "set1")!.text).toBe("set 1 token 4242 · quota 64 · in use 2 VFIO container 1 (vm1)");
    expect(nodes.filter((n) => n.kind === "entry").map((n) => n.text.split(" ").slice(0, 2).join(" "))).toEqual([
      "KVM VMCS",
      "VDCM idxd0",
      "VDCM idxd0",
      "IOMMU 0000:6a:01.0",
      "IOMMU 0000:6a:01.0",
    ]);
    const edges = [...svg.matchAll(/<path class="edge" data-from="(\w+)" data-to="(\w+)"/g)].map((m) => `${m[1]}->${m[2]}`);
    expect(edges).toHaveLength(g.nodes.filter((n) => n.parent !== undefined).length);
    expect(edges).toContain("ioasid1h2->kvm1g101");
    // Columns left to right: every edge goes from one column to the next.
    const x = (id: string) => Number(new RegExp(`data-id="${id}"[^>]*><rect x="(\\d+)"`).exec(svg)![1]);
    for (const e of edges) {
      const [from, to] = e.split("->") as [string, string];
      expect(x(to)).toBeGreaterThan(x(from));
    }
    // Every box is inside the drawing, and no two boxes of one column overlap.
    const [, width, height] = /width="(\d+)" height="(\d+)"/.exec(svg)!.map(Number) as [number, number, number];
    const boxes = [...svg.matchAll(/<rect x="([\d.]+)" y="([\d.]+)" width="(\d+)" height="(\d+)" rx/g)].map(
      (m) => m.slice(1).map(Number) as [number, number, number, number],
    );
    for (const [bx, by, bw, bh] of boxes) expect(bx + bw <= width && by + bh <= height).toBe(true);
    for (const a of boxes) for (const b of boxes) if (a !== b && a[0] === b[0]) expect(a[1] + a[3] <= b[1] || b[1] + b[3] <= a[1]).toBe(true);
  });

  it("is one self-contained HTML page: the SVG inline, no script, nothing fetched", () => {
    const html = renderStateHtml(snapshot());
    expect(html).toMatch(/^<!doctype html>/);
    expect(html).toContain("<svg xmlns=");
    expect(html).not.toMatch(/<script|<link|<img|\bsrc=|\bhref=|@import|url\(/i);
    // The only URL is the SVG namespace (an identifier, never fetched).
    expect(html.match(/https?:\/\/[^\s"']+/g)).toEqual(["http://www.w3.org/2000/svg"]);
    expect(html).toContain("IOASID namespace: capacity 1048576");
  });

  it("marks a service that did not answer, in the picture, the page and the report", () => {
    const s = { ...snapshot(), kvm: undefined, unreachable: { kvm: "UNAVAILABLE: connect ECONNREFUSED 127.0.0.1:50054" } };
    delete (s as { kvm?: unknown }).kvm;
    const g = buildStateGraph(s);
    expect(g.nodes.some((n) => n.lines[0]!.startsWith("KVM"))).toBe(false);
    expect(renderStateSvg(g)).toContain(">kvm: UNREACHABLE (UNAVAILABLE: connect ECONNREFUSED 127.0.0.1:50054)</text>");
    expect(renderStateHtml(s)).toContain('<p class="unreachable">kvm: UNREACHABLE (UNAVAILABLE: connect ECONNREFUSED 127.0.0.1:50054)</p>');
    const text = renderInspectText(s);
    expect(text).toContain("kvm VMCS PASID translation tables\n  kvm: UNREACHABLE (UNAVAILABLE: connect ECONNREFUSED 127.0.0.1:50054)");
    expect(text).toContain("vdcm devices\n  idxd0: PASID entries 1(wq0, set 1), 2(wq3, set 1)");
    expect(text).toMatch(/1 of 5 services unreachable: kvm$/);
    expect(inspectJson(s)).toMatchObject({
      kvm: null,
      vdcm: { devices: [{ deviceId: "idxd0" }] },
      unreachable: { kvm: expect.stringContaining("ECONNREFUSED") },
    });
    expect(renderStateMermaid(g)).toContain('down_kvm["kvm: UNREACHABLE<br/>UNAVAILABLE: connect ECONNREFUSED<br/>127.0.0.1:50054"]');
    checkFlowchart(renderStateMermaid(g));
  });

  it("with the core down, draws the roles' entries under IOASIDs it cannot name", () => {
    const s: InspectSnapshot = { ...snapshot(), unreachable: { core: "UNAVAILABLE: connect ECONNREFUSED" } };
    delete (s as { core?: unknown }).core;
    const g = buildStateGraph(s);
    expect(g.nodes.filter((n) => n.kind === "set")).toEqual([]);
    expect(g.nodes.find((n) => n.id === "ioasid1")).toMatchObject({ tone: "unknown", lines: ["IOASID 1", "core unreachable"] });
    expect(g.nodes.filter((n) => n.kind === "entry").every((n) => n.tone === "ok")).toBe(true);
    expect(inspectJson(s)).toMatchObject({ stats: null, sets: null, ioasids: null, registrations: null, unreachable: { core: expect.any(String) } });
  });

  it("renders a Mermaid flowchart of the same nodes and links", () => {
    const g = buildStateGraph(snapshot());
    const text = renderStateMermaid(g);
    expect(text).toContain("ioasid1h2 --> kvm1g101");
    expect(text).toContain('iommu0000_6a_01_0p1["IOMMU 0000:6a:01.0 PASID 1<br/>NESTED domain 2 · handle 1 · gpasid 101"]');
    const { nodes, edges } = checkFlowchart(text);
    expect(nodes.sort()).toEqual(g.nodes.map((n) => n.id).sort());
    expect(edges).toHaveLength(g.nodes.filter((n) => n.parent !== undefined).length);
  });
});

describe("inspect's report", () => {
  it("prints the IOMMU's tables readably: PASID tables, domains, handles with their owner data as text", () => {
    const text = renderInspectText(snapshot());
    const iommuPart = text.slice(text.indexOf("\niommu\n"));
    expect(iommuPart).toContain("    PASID 1      NESTED domain 2  handle 1  set 1 gpasid 101  gen 1");
    expect(iommuPart).toContain("    RID_PASID    PAGING domain 1  handle 9");
    expect(iommuPart).toContain('owner vfio/vfio-1 {"containerId":1,"device":{"kind":"mdev","id":"mdev1"}}');
    // Not the JSON dump it was (ownerData as one line per byte).
    expect(iommuPart).not.toMatch(/^\s+\d+,?$/m);
    expect(iommuPart.split("\n").length).toBeLessThan(12);
  });

  it("lists a container's vIOMMUs with their vdevices' virt_ids and event queues", () => {
    const s = snapshot();
    const pci = (id: string) => ({ ref: { $case: "deviceId" as const, value: id } });
    const withViommu: InspectSnapshot = {
      ...s,
      vfio: vfio.QueryStateResponse.fromPartial({
        containers: [
          {
            containerId: 1,
            setId: 1,
            vmName: "vm1",
            viommus: [
              {
                viommuId: 5,
                device: pci("0000:6a:01.0"),
                parentDomainId: 1,
                vdevices: [{ vdeviceId: 6, device: pci("0000:6a:02.0"), virtId: 0x42n }],
                veventqs: [{ veventqId: 7, depth: 2 }],
              },
            ],
          },
        ],
      }),
    };
    expect(renderInspectText(withViommu)).toContain("    viommu 5 via 0000:6a:01.0 over domain 1  vdevices 6(0000:6a:02.0=0x42)  eventqs 7(depth 2)");
  });

  it("shows owner data that is not text as hex", () => {
    expect(describeOwnerData(new Uint8Array([0, 1, 0xfe]))).toBe("0x0001fe");
    expect(describeOwnerData(new Uint8Array())).toBe("-");
    expect(describeOwnerData(new TextEncoder().encode("conform"))).toBe("conform");
  });
});

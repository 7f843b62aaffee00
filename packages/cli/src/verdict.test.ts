import { describe, expect, it } from "vitest";
import { createHistoryRecord, eventTypeOf, type HistoryActionInput, type HistoryLink, type HistoryRecord } from "@ioasid/bus";
import { history as h } from "@ioasid/proto";
import type { StackClients } from "./clients.js";
import { checkInvariants } from "./verdict.js";

// The scenario verdict's S5 (teardown order after FREE) orders records as the checker does —
// by their sequences and causal links — not by the times different processes stamped (issue 18).
// The history below is the crashed guest's teardown in the right order, with the core's stamp
// of KVM's release later than VDCM's stamp of the clear that release caused (a busy core: seen
// once in CI). Pure: the service queries the verdict makes (S6, S9) are in-memory stand-ins.

const IOASID = 7;
const GEN = 1;
const link = (role: string, instance: string, publisherSeq: number): HistoryLink => ({ role, instance, incarnation: "run", publisherSeq });
const core = (ts: number, publisherSeq: number, action: HistoryActionInput, refcount: number, after: HistoryLink[] = []): HistoryRecord =>
  createHistoryRecord(
    { role: "ioasid", instance: "core" },
    action,
    { ioasid: IOASID, generation: GEN, setId: 1, refcount, publisherSeq, incarnation: "run", after },
    ts,
  );
const role = (name: string, ts: number, publisherSeq: number, action: HistoryActionInput, after: HistoryLink[]): HistoryRecord =>
  createHistoryRecord({ role: name, instance: `${name}0` }, action, { ioasid: IOASID, generation: GEN, setId: 1, publisherSeq, incarnation: "run", after }, ts);
const notify = (type: "ALLOC" | "BIND" | "FREE" | "RECLAIM"): HistoryActionInput => ({ $case: "ioasidNotify", value: { type: eventTypeOf(type) } });
const get = (holder: string): HistoryActionInput => ({ $case: "ioasidGet", value: { holder: { role: holder, instance: `${holder}0`, purpose: "x" } } });
const put = (holder: string): HistoryActionInput => ({ $case: "ioasidPut", value: { holder: { role: holder, instance: `${holder}0`, purpose: "x" } } });

/** The crash life cycle's records; `kvmReleaseTs` is the core's stamp of KVM's release. */
function crashHistory(kvmReleaseTs: number, vdcmClearAfterRelease: boolean): HistoryRecord[] {
  return [
    core(100, 1, notify("ALLOC"), 1),
    core(101, 2, get("iommu"), 2),
    core(102, 3, notify("BIND"), 2),
    core(103, 4, get("kvm"), 3),
    core(104, 5, get("vdcm"), 4),
    core(200, 6, notify("FREE"), 3),
    role("kvm", 201, 1, { $case: "vmcsUpdate", value: { kind: h.VmcsUpdateKind.VMCS_UPDATE_KIND_CLEAR, gpasid: 101, hpasid: IOASID } }, [
      link("ioasid", "core", 6),
    ]),
    core(kvmReleaseTs, 7, put("kvm"), 2, [link("kvm", "kvm0", 1)]),
    // VDCM's delivery was sent after the core applied KVM's release: its handling follows it.
    role("vdcm", 205, 1, { $case: "vdevClear", value: { device: "idxd0" } }, [link("ioasid", "core", vdcmClearAfterRelease ? 7 : 6)]),
    core(230, 8, put("vdcm"), 1, [link("vdcm", "vdcm0", 1)]),
    role("iommu", 231, 1, { $case: "teardownPasid", value: { device: "idxd0" } }, [link("ioasid", "core", 8)]),
    core(232, 9, put("iommu"), 0, [link("iommu", "iommu0", 1)]),
    core(233, 10, notify("RECLAIM"), 0),
  ];
}

const clients = {
  core: { getStats: () => Promise.resolve({ available: 10, quotaTotal: 6, allocatable: 16 }) },
  kvm: { queryState: () => Promise.resolve({}) },
  vdcm: { queryState: () => Promise.resolve({}) },
  iommu: { queryState: () => Promise.resolve({}) },
} as unknown as StackClients;

const s5 = async (records: HistoryRecord[]) =>
  (await checkInvariants("crash", clients, { records, hpasid: IOASID, generation: GEN, setId: 1, vmId: 1 })).checks.find((c) => c.id === "S5")!;

describe("the scenario verdict's S5", () => {
  it("holds when the records' links put KVM's release before VDCM's clear, whatever the stamps say", async () => {
    const check = await s5(crashHistory(210, true));
    expect(check.detail).toBe("kvm clears → kvm releases → vdcm drains/clears → vdcm releases → iommu tears down → iommu releases → reclaim");
    expect(check.ok).toBe(true);
  });

  it("fails when nothing orders VDCM's clear after KVM's release and it came first", async () => {
    // VDCM's handling linked only to the FREE, and stamped before the release: out of order.
    expect((await s5(crashHistory(210, false))).ok).toBe(false);
  });
});

import { history as h } from "@ioasid/proto";
import { describe, expect, it } from "vitest";
import { CHAOS_ROLE, createChaosRecord, parseChaosRecord, roleOfTarget } from "./chaos-record.js";

describe("createChaosRecord / parseChaosRecord", () => {
  it("records an operation with its IOASID fields on the record too, and reads it back", () => {
    const r = createChaosRecord("ok", { op: "free", opId: 17, vm: "g3", setId: 3, ioasid: 201, generation: 2, latencyMs: 3 }, { ts: 1000 });
    expect(r).toMatchObject({ ts: 1000, role: CHAOS_ROLE, instance: "driver", ioasid: 201, generation: 2, setId: 3 });
    expect(r.action).toEqual({
      $case: "chaosOp",
      value: { phase: h.ChaosPhase.CHAOS_PHASE_OK, op: "free", opId: 17, vm: "g3", latencyMs: 3, error: undefined },
    });
    expect(parseChaosRecord(r)).toEqual({
      kind: "op",
      action: "ok",
      op: { op: "free", opId: 17, vm: "g3", setId: 3, ioasid: 201, generation: 2, latencyMs: 3 },
    });
  });

  it("records faults and heals as info from the nemesis", () => {
    const fault = createChaosRecord("info", { fault: "partition", target: "vdcm", link: "nats", faultId: 4 });
    expect(fault).toMatchObject({ role: "chaos", instance: "nemesis", action: { $case: "chaosFault" } });
    expect(fault.ts).toBeGreaterThan(Date.now() - 60_000);
    expect(parseChaosRecord(fault)).toEqual({ kind: "fault", marker: { fault: "partition", target: "vdcm", link: "nats", faultId: 4 } });
    expect(parseChaosRecord(createChaosRecord("info", { heal: true }))).toEqual({ kind: "heal", marker: { heal: true } });
    expect(parseChaosRecord(createChaosRecord("info", { note: "seed 7" }))).toEqual({ kind: "note", note: "seed 7" });
  });

  it("reads back a process exit the runner saw (cause exit) as a kill-restart marker, and refuses a cause that is not a string", () => {
    const exit = createChaosRecord("info", { fault: "kill-restart", target: "ioasid-core", faultId: 10_001, cause: "exit" });
    expect(parseChaosRecord(exit)).toEqual({ kind: "fault", marker: { fault: "kill-restart", target: "ioasid-core", faultId: 10_001, cause: "exit" } });
    // Through the wire and back (a cause is a string by the catalogue's type).
    expect(parseChaosRecord(h.HistoryRecord.decode(h.HistoryRecord.encode(exit).finish()))).toEqual(parseChaosRecord(exit));
  });

  it("refuses a fault or heal marker under another action than info", () => {
    expect(() => createChaosRecord("ok", { heal: true })).toThrow(/"info"/);
    expect(() => createChaosRecord("invoke", { fault: "kill-restart", target: "kvm" })).toThrow(/"info"/);
  });

  it("reads nothing from other roles, other actions or an operation without its phase", () => {
    const op = createChaosRecord("ok", { op: "free", opId: 1 });
    expect(parseChaosRecord({ ...op, role: "kvm" })).toBeUndefined();
    expect(parseChaosRecord({ ...op, action: { $case: "vmcsUpdate", value: h.VmcsUpdate.fromPartial({}) } })).toBeUndefined();
    expect(parseChaosRecord({ ...op, action: { $case: "chaosOp", value: h.ChaosOp.fromPartial({ op: "free", opId: 1 }) } })).toBeUndefined();
    expect(parseChaosRecord({ ...op, action: undefined })).toBeUndefined();
  });

  it("names the core's history column for the ioasid-core target", () => {
    expect(roleOfTarget("ioasid-core")).toBe("ioasid");
    expect(roleOfTarget("vdcm")).toBe("vdcm");
  });
});

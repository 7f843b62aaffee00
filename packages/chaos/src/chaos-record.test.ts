import { describe, expect, it } from "vitest";
import { CHAOS_ROLE, createChaosRecord, parseChaosRecord, roleOfTarget } from "./chaos-record.js";

describe("createChaosRecord / parseChaosRecord", () => {
  it("records an operation with its IOASID fields on the record too, and reads it back", () => {
    const r = createChaosRecord("ok", { op: "free", opId: 17, vm: "g3", setId: 3, ioasid: 201, generation: 2, latencyMs: 3 }, { ts: 1000 });
    expect(r).toMatchObject({ ts: 1000, role: CHAOS_ROLE, instance: "driver", action: "ok", ioasid: 201, generation: 2, setId: 3 });
    expect(JSON.parse(r.detail!)).toEqual({ op: "free", opId: 17, vm: "g3", setId: 3, ioasid: 201, generation: 2, latencyMs: 3 });
    expect(parseChaosRecord(r)).toEqual({ kind: "op", action: "ok", op: { op: "free", opId: 17, vm: "g3", setId: 3, ioasid: 201, generation: 2, latencyMs: 3 } });
  });

  it("records faults and heals as info from the nemesis", () => {
    const fault = createChaosRecord("info", { fault: "partition", target: "vdcm", link: "nats", faultId: 4 });
    expect(fault).toMatchObject({ role: "chaos", instance: "nemesis", action: "info" });
    expect(fault.ts).toBeGreaterThan(Date.now() - 60_000);
    expect(parseChaosRecord(fault)).toEqual({ kind: "fault", marker: { fault: "partition", target: "vdcm", link: "nats", faultId: 4 } });
    expect(parseChaosRecord(createChaosRecord("info", { heal: true }))).toEqual({ kind: "heal", marker: { heal: true } });
    expect(parseChaosRecord(createChaosRecord("info", { note: "seed 7" }))).toEqual({ kind: "note", note: "seed 7" });
  });

  it("reads back a process exit the runner saw (cause exit) as a kill-restart marker, and refuses a cause that is not a string", () => {
    const exit = createChaosRecord("info", { fault: "kill-restart", target: "ioasid-core", faultId: 10_001, cause: "exit" });
    expect(parseChaosRecord(exit)).toEqual({ kind: "fault", marker: { fault: "kill-restart", target: "ioasid-core", faultId: 10_001, cause: "exit" } });
    expect(parseChaosRecord({ ...exit, detail: `{"fault":"kill-restart","target":"vdcm","cause":1}` })).toBeUndefined();
  });

  it("refuses a fault or heal marker under another action than info", () => {
    expect(() => createChaosRecord("ok", { heal: true })).toThrow(/"info"/);
    expect(() => createChaosRecord("invoke", { fault: "kill-restart", target: "kvm" })).toThrow(/"info"/);
  });

  it("reads nothing from other roles, unknown actions or details of another shape", () => {
    const base = { ts: 1, role: CHAOS_ROLE, instance: "driver", action: "ok" };
    expect(parseChaosRecord({ ...base, role: "kvm", detail: `{"op":"free","opId":1}` })).toBeUndefined();
    expect(parseChaosRecord({ ...base, action: "done", detail: `{"op":"free","opId":1}` })).toBeUndefined();
    expect(parseChaosRecord({ ...base, detail: "not json" })).toBeUndefined();
    expect(parseChaosRecord({ ...base, detail: `[1]` })).toBeUndefined();
    expect(parseChaosRecord({ ...base, detail: `{"op":"free","opId":"1"}` })).toBeUndefined();
    expect(parseChaosRecord({ ...base, detail: `{"op":"free","opId":1,"ioasid":"201"}` })).toBeUndefined();
    expect(parseChaosRecord({ ...base, detail: `{"heal":true}` })).toBeUndefined(); // a heal is info
    expect(parseChaosRecord({ ...base })).toBeUndefined();
  });

  it("names the core's history column for the ioasid-core target", () => {
    expect(roleOfTarget("ioasid-core")).toBe("ioasid");
    expect(roleOfTarget("vdcm")).toBe("vdcm");
  });
});

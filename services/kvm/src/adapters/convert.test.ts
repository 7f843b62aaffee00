import { history as h } from "@ioasid/proto";
import { describe, expect, it } from "vitest";
import { VmcsClearCause, VmcsUpdateKind, type KvmHistoryAction } from "../domain/kvm-history.js";
import { toHistoryAction, toHistorySink } from "./convert.js";

describe("toHistoryAction", () => {
  it("records an install as VMCS_UPDATE_KIND_INSTALL, without a cause", () => {
    expect(toHistoryAction({ $case: "vmcsUpdate", value: { kind: VmcsUpdateKind.INSTALL, gpasid: 101, hpasid: 201 } })).toStrictEqual({
      $case: "vmcsUpdate",
      value: { kind: h.VmcsUpdateKind.VMCS_UPDATE_KIND_INSTALL, gpasid: 101, hpasid: 201 },
    });
  });

  it.each([
    [VmcsClearCause.UNBIND, h.VmcsClearCause.VMCS_CLEAR_CAUSE_UNBIND],
    [VmcsClearCause.FREE, h.VmcsClearCause.VMCS_CLEAR_CAUSE_FREE],
    [VmcsClearCause.REPLACED, h.VmcsClearCause.VMCS_CLEAR_CAUSE_REPLACED],
    [VmcsClearCause.VM_DESTROYED, h.VmcsClearCause.VMCS_CLEAR_CAUSE_VM_DESTROYED],
    [VmcsClearCause.RECONCILE, h.VmcsClearCause.VMCS_CLEAR_CAUSE_RECONCILE],
  ])("records a clear caused by %s with its catalogue cause", (cause, wire) => {
    expect(toHistoryAction({ $case: "vmcsUpdate", value: { kind: VmcsUpdateKind.CLEAR, gpasid: 101, hpasid: 201, cause } })).toStrictEqual({
      $case: "vmcsUpdate",
      value: { kind: h.VmcsUpdateKind.VMCS_UPDATE_KIND_CLEAR, gpasid: 101, hpasid: 201, cause: wire },
    });
  });

  it("passes every other case through as it is, and the sink keeps the fields", () => {
    const step: KvmHistoryAction = { $case: "kvmDestroyVm", value: { cleared: 1, dropped: 2 } };
    expect(toHistoryAction(step)).toBe(step);
    const seen: unknown[] = [];
    toHistorySink({ record: (action, fields) => seen.push([action, fields]) }).record(step, { setId: 3 });
    expect(seen).toEqual([[step, { setId: 3 }]]);
  });
});

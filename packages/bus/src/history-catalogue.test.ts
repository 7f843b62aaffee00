import { describe, expect, it } from "vitest";
import { history as h } from "@ioasid/proto";
import { BinaryWriter } from "@bufbuild/protobuf/wire";
import { actionName, createHistoryRecord, describeAction, HISTORY_ACTION_CASES, historyRecordToJson, parseHistoryJsonl } from "./history-catalogue.js";
import { decodeHistoryBatch } from "./history.js";

const who = { role: "kvm", instance: "vm-1" };

describe("the history catalogue", () => {
  it("names each action after its catalogue field, in the kernel's words", () => {
    expect(actionName("vmcsUpdate")).toBe("vmcs_update");
    expect(actionName("ioasidRegisterNotifierMm")).toBe("ioasid_register_notifier_mm");
    expect(actionName({ $case: "teardownPasid", value: h.PasidEntry.fromPartial({}) })).toBe("teardown_pasid");
    // The table that builds records is typed over every case of the oneof; each name is distinct.
    expect(new Set(HISTORY_ACTION_CASES.map(actionName)).size).toBe(HISTORY_ACTION_CASES.length);
  });

  it("fills a case's unset fields with their defaults and says what the component did", () => {
    const r = createHistoryRecord(
      who,
      {
        $case: "vmcsUpdate",
        value: { kind: h.VmcsUpdateKind.VMCS_UPDATE_KIND_CLEAR, gpasid: 101, hpasid: 201, cause: h.VmcsClearCause.VMCS_CLEAR_CAUSE_FREE },
      },
      { ioasid: 201 },
      5,
    );
    expect(r).toMatchObject({ ts: 5, role: "kvm", instance: "vm-1", ioasid: 201, recovered: false });
    expect(describeAction(r)).toBe("clear gpasid 101 → hpasid 201 (FREE)");
    const flush = createHistoryRecord(
      { role: "iommu", instance: "dmar0" },
      { $case: "iotlbFlush", value: { scope: "RANGE", cause: "UNMAP", domain: 3, device: "idxd0", devtlb: true, address: 0x1000n, size: 0x2000n } },
    );
    expect(describeAction(flush)).toBe("RANGE UNMAP domain 3 device idxd0 +devtlb 0x1000+0x2000");
  });

  it("round-trips a record through a binary batch and through a history.jsonl line", () => {
    const r = createHistoryRecord(
      who,
      { $case: "ioasidGet", value: { holder: { role: "kvm", instance: "vm-1", purpose: "vmcs" } } },
      { ioasid: 201, refcount: 2, seq: 17 },
      1.5,
    );
    const w = new BinaryWriter();
    w.uint32(10).bytes(h.HistoryRecord.encode(r).finish());
    expect(decodeHistoryBatch(w.finish(), "test")).toEqual([r]);
    expect(parseHistoryJsonl(`${historyRecordToJson(r)}\n`)).toEqual([r]);
  });

  it("refuses a history message of the old JSON format, saying to start from an empty store", () => {
    const old = new TextEncoder().encode(
      JSON.stringify([{ ts: 1, role: "kvm", instance: "vm-1", action: "vmcs_update", detail: "install gpasid 101 → hpasid 201" }]),
    );
    expect(() => decodeHistoryBatch(old, "message 3")).toThrow(/message 3: a history message of the old JSON format.*start from an empty store/);
  });

  it("refuses a record whose action is unset or unknown, never skipping it", () => {
    const noAction = new BinaryWriter();
    noAction
      .uint32(10)
      .bytes(h.HistoryRecord.encode({ ts: 1, role: "kvm", instance: "vm-1", recovered: false, incarnation: "", after: [], action: undefined }).finish());
    expect(() => decodeHistoryBatch(noAction.finish(), "message 4")).toThrow(/message 4: a kvm\/vm-1 record at 1 has no action this catalogue knows/);
    // A case of a newer catalogue (field 999) decodes to no action here: refused the same way.
    const rec = new BinaryWriter();
    rec
      .uint32(18)
      .string("kvm")
      .uint32((999 << 3) | 2)
      .bytes(new Uint8Array());
    const newer = new BinaryWriter();
    newer.uint32(10).bytes(rec.finish());
    expect(() => decodeHistoryBatch(newer.finish(), "message 5")).toThrow(/has no action this catalogue knows/);
    expect(() => parseHistoryJsonl(`{"ts":1,"role":"kvm","instance":"vm-1"}\n`, "h.jsonl")).toThrow(/h\.jsonl:1: .*no action/);
  });

  it("refuses a history.jsonl line of the old format", () => {
    const line = JSON.stringify({ ts: 1, role: "kvm", instance: "vm-1", action: "vmcs_update", detail: "install" });
    expect(() => parseHistoryJsonl(`\n${line}\n`, "run/history.jsonl")).toThrow(/run\/history\.jsonl:2: a record of the old format/);
  });
});

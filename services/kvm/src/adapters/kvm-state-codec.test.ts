import { describe, expect, it } from "vitest";
import { kvmState } from "@ioasid/proto";
import type { KvmKeptEntry } from "../domain/kvm-kept-entry.js";
import { KVM_STATE_FORMAT, kvmStateCodec } from "./kvm-state-codec.js";

// Every field of every kind, none at its default: a field the codec forgets comes back different.
const entries: KvmKeptEntry[] = [
  {
    kind: "vm",
    vmId: 7,
    instance: "vm-7",
    mmToken: 0xffff_ffff_ffff_fff0n,
    vmName: "guest",
    vcpuCount: 4,
    createdAt: new Date(1_700_000_000_123),
    registrationId: 12,
    setId: 3,
  },
  {
    kind: "vmcsEntry",
    vmId: 7,
    gpasid: 101,
    hpasid: 201,
    generation: 2,
    bindSeq: (1n << 60n) + 5n,
    installedAt: new Date(1_700_000_001_456),
    refSetId: 3,
    refGeneration: 2,
  },
];

describe("kvmStateCodec", () => {
  it("round-trips every field of every kind of kept entry through ioasid.kvm.v1.KvmStateEntry", () => {
    for (const e of entries) expect(kvmStateCodec.decode(kvmStateCodec.encode(e))).toEqual(e);
    expect(KVM_STATE_FORMAT).toBe("ioasid.kvm.v1.KvmStateEntry");
  });

  it("refuses an entry without its kind, or without a required time", () => {
    expect(() => kvmStateCodec.decode(kvmState.KvmStateEntry.encode({ entry: undefined }).finish())).toThrow("KvmStateEntry.entry is missing");
    const vm = kvmState.KvmStateEntry.encode({ entry: { $case: "vm", value: kvmState.KeptVm.fromPartial({ vmId: 1 }) } }).finish();
    expect(() => kvmStateCodec.decode(vm)).toThrow("KeptVm.created_at is missing");
  });
});

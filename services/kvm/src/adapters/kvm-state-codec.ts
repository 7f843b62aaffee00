import { protoStateCodec, requireField, type StateCodec } from "@ioasid/bus";
import { kvmState } from "@ioasid/proto";
import type { KvmKeptEntry } from "../domain/kvm-kept-entry.js";

// KVM's kept entries ↔ ioasid.kvm.v1.KvmStateEntry (kvm_state.proto): the one place that knows both
// the domain's kept tables and the generated state messages, so kvm.ts stays free of proto types.

/** The proto message every message of KVM's store holds (its format marker). */
export const KVM_STATE_FORMAT = `${kvmState.protobufPackage}.KvmStateEntry`;

/** A kept entry as its state message. */
export function toKvmStateEntry(e: KvmKeptEntry): kvmState.KvmStateEntry {
  switch (e.kind) {
    case "vm":
      return {
        entry: {
          $case: "vm",
          value: {
            vmId: e.vmId,
            instance: e.instance,
            mmToken: e.mmToken,
            vmName: e.vmName,
            vcpuCount: e.vcpuCount,
            createdAt: e.createdAt,
            registrationId: e.registrationId,
            setId: e.setId,
          },
        },
      };
    case "vmcsEntry":
      return {
        entry: {
          $case: "vmcsEntry",
          value: {
            vmId: e.vmId,
            gpasid: e.gpasid,
            hpasid: e.hpasid,
            generation: e.generation,
            bindSeq: e.bindSeq,
            installedAt: e.installedAt,
            refSetId: e.refSetId,
            refGeneration: e.refGeneration,
          },
        },
      };
  }
}

/**
 * A state message as the kept entry it holds.
 * @throws Error when its kind or a required field is missing (the store refuses it at start)
 */
export function fromKvmStateEntry(m: kvmState.KvmStateEntry): KvmKeptEntry {
  const entry = requireField(m.entry, "KvmStateEntry.entry");
  switch (entry.$case) {
    case "vm": {
      const v = entry.value;
      return {
        kind: "vm",
        vmId: v.vmId,
        instance: v.instance,
        mmToken: v.mmToken,
        vmName: v.vmName,
        vcpuCount: v.vcpuCount,
        createdAt: requireField(v.createdAt, "KeptVm.created_at"),
        registrationId: v.registrationId,
        setId: v.setId,
      };
    }
    case "vmcsEntry": {
      const t = entry.value;
      return {
        kind: "vmcsEntry",
        vmId: t.vmId,
        gpasid: t.gpasid,
        hpasid: t.hpasid,
        generation: t.generation,
        bindSeq: t.bindSeq,
        installedAt: requireField(t.installedAt, "KeptVmcsEntry.installed_at"),
        refSetId: t.refSetId,
        refGeneration: t.refGeneration,
      };
    }
  }
}

/** KVM's kept entries as ioasid.kvm.v1.KvmStateEntry bytes (its RoleState and MemoryRoleState). */
export const kvmStateCodec: StateCodec<KvmKeptEntry> = protoStateCodec(KVM_STATE_FORMAT, kvmState.KvmStateEntry, toKvmStateEntry, fromKvmStateEntry);

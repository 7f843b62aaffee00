import type { StateChange } from "@ioasid/bus";
import type { HistorySink } from "./kvm-history.js";
import { VirtualMachine } from "./virtual-machine.js";

/** A VM as KVM keeps it in its store (its table is kept entry by entry): `vm/<vmId>`. */
export interface KeptVm {
  readonly kind: "vm";
  readonly vmId: number;
  readonly instance: string;
  readonly mmToken: bigint;
  readonly vmName: string;
  readonly vcpuCount: number;
  readonly createdAt: Date;
  readonly registrationId: number;
  /** 0 while not known. */
  readonly setId: number;
}

/** One VMCS PASID translation as KVM keeps it, with the reference behind it: `vmcs/<vmId>/<hpasid>`. */
export interface KeptVmcsEntry {
  readonly kind: "vmcsEntry";
  readonly vmId: number;
  readonly gpasid: number;
  readonly hpasid: number;
  readonly generation: number;
  readonly bindSeq: bigint;
  readonly installedAt: Date;
  /** The set and generation of the `vmcs` reference behind the entry. */
  readonly refSetId: number;
  readonly refGeneration: number;
}

/** One entry of KVM's kept state (ioasid.kvm.v1.KvmStateEntry; kvm-state-codec.ts converts). */
export type KvmKeptEntry = KeptVm | KeptVmcsEntry;

/** Store key of a kept VM. */
export const vmKey = (vmId: number) => `vm/${vmId}`;
/** Store key of a kept VMCS entry. */
export const vmcsKey = (vmId: number, hpasid: number) => `vmcs/${vmId}/${hpasid}`;

/** Rebuilds the VMs and tables a store kept (a KVM killed with -9 comes back with them). */
export function restoreVms(saved: ReadonlyMap<string, KvmKeptEntry>, history: (instance: string) => HistorySink): VirtualMachine[] {
  const vms = new Map<number, VirtualMachine>();
  for (const v of saved.values()) {
    if (v.kind !== "vm") continue;
    const vm = new VirtualMachine(v.vmId, v.instance, v.mmToken, v.vmName, v.vcpuCount, v.createdAt, history(v.instance));
    vm.registrationId = v.registrationId;
    vm.setId = v.setId;
    vms.set(vm.vmId, vm);
  }
  for (const t of saved.values()) {
    const vm = t.kind === "vmcsEntry" ? vms.get(t.vmId) : undefined;
    if (t.kind !== "vmcsEntry" || vm === undefined) continue;
    vm.table.install({ gpasid: t.gpasid, hpasid: t.hpasid, generation: t.generation, bindSeq: t.bindSeq, installedAt: t.installedAt });
    vm.refs.set(t.hpasid, { setId: t.refSetId, generation: t.refGeneration });
  }
  return [...vms.values()];
}

/** The kept form of a VM. */
export function vmChange(vm: VirtualMachine): StateChange<KvmKeptEntry> {
  const kept: KeptVm = {
    kind: "vm",
    vmId: vm.vmId,
    instance: vm.instance,
    mmToken: vm.mmToken,
    vmName: vm.vmName,
    vcpuCount: vm.vcpuCount,
    createdAt: vm.createdAt,
    registrationId: vm.registrationId,
    setId: vm.setId,
  };
  return { key: vmKey(vm.vmId), value: kept };
}

/** The kept form of the entry of `hpasid` (deleted when the table has none, or no reference backs it). */
export function entryChange(vm: VirtualMachine, hpasid: number): StateChange<KvmKeptEntry> {
  const t = vm.table.findByHpasid(hpasid);
  const ref = vm.refs.get(hpasid);
  if (t === undefined || ref === undefined) return { key: vmcsKey(vm.vmId, hpasid), value: undefined };
  const kept: KeptVmcsEntry = {
    kind: "vmcsEntry",
    vmId: vm.vmId,
    gpasid: t.gpasid,
    hpasid: t.hpasid,
    generation: t.generation,
    bindSeq: t.bindSeq,
    installedAt: t.installedAt,
    refSetId: ref.setId,
    refGeneration: ref.generation,
  };
  return { key: vmcsKey(vm.vmId, hpasid), value: kept };
}

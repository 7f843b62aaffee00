import type { RegistrationStatus } from "./holder-reference.js";
import type { VirtualMachine } from "./virtual-machine.js";
import type { PasidTranslation } from "./vmcs-pasid-table.js";

/** A VM as KVM shows it (QueryState, CreateVm). */
export interface VmSnapshot {
  readonly vmId: number;
  readonly instance: string;
  readonly mmToken: bigint;
  readonly vmName: string;
  readonly vcpuCount: number;
  readonly registration: "PENDING" | "ACTIVE";
  /** The VM's set once the registration is active; 0 while pending. */
  readonly setId: number;
  /** The VMCS PASID translation table, ascending by guest PASID. */
  readonly translations: readonly PasidTranslation[];
  /** IOASID references held for this VM. */
  readonly referencesHeld: number;
  readonly createdAt: Date;
}

/** A VM as it is shown, with its registration as the core reports it (none: PENDING). */
export function vmSnapshot(vm: VirtualMachine, registration: RegistrationStatus | undefined): VmSnapshot {
  const active = registration?.active === true;
  return {
    vmId: vm.vmId,
    instance: vm.instance,
    mmToken: vm.mmToken,
    vmName: vm.vmName,
    vcpuCount: vm.vcpuCount,
    registration: active ? "ACTIVE" : "PENDING",
    setId: active ? registration.setId : 0,
    translations: vm.table.entries(),
    referencesHeld: vm.refs.size,
    createdAt: vm.createdAt,
  };
}

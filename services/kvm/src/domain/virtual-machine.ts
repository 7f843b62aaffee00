import type { EventSubscription } from "./kvm-event.js";
import type { HistorySink } from "./kvm-history.js";
import { VmcsPasidTable } from "./vmcs-pasid-table.js";

/** A reference held for a VM: the host PASID's set and generation. */
export interface HeldReference {
  readonly setId: number;
  readonly generation: number;
}

/** One VM: its vCPUs, its VMCS PASID translation table and the references behind the entries. */
export class VirtualMachine {
  readonly table = new VmcsPasidTable();
  /** Host PASID → the `vmcs` reference held on it (one per host PASID the VM got a BIND for). */
  readonly refs = new Map<number, HeldReference>();
  /** `ioasid:generation` of ioasid_get() calls whose outcome is unknown (a timeout): check before taking another. */
  readonly uncertainGets = new Set<string>();
  registrationId = 0;
  subscription: EventSubscription | undefined;
  /** False once destroyed: late event handlers leave nothing behind. */
  alive = true;
  destroying = false;
  /** The VM's set, learned from its events (0: none seen yet). */
  setId = 0;

  constructor(
    readonly vmId: number,
    readonly instance: string,
    readonly mmToken: bigint,
    readonly vmName: string,
    readonly vcpuCount: number,
    readonly createdAt: Date,
    readonly history: HistorySink,
  ) {}
}

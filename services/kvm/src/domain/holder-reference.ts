/** Subscriber name KVM registers with the core, and holder role of its references. */
export const KVM_SUBSCRIBER = "kvm";
/** Purpose of the reference KVM holds per VMCS PASID translation entry: `kvm/vm-<id>/vmcs`. */
export const VMCS_PURPOSE = "vmcs";

/** The notifier instance of a VM: `vm-<id>` (also the holder instance of its references). */
export function vmInstance(vmId: number): string {
  return `vm-${vmId}`;
}
/** A VM's notifier registration as the core reports it. */
export interface RegistrationStatus {
  readonly registrationId: number;
  /** Subscriber instance (`vm-<id>`). */
  readonly instance: string;
  /** Attached to its set (false: pending until VFIO creates the set). */
  readonly active: boolean;
  /** The set it is attached to (0 while pending). */
  readonly setId: number;
}

/** One reference of a KVM holder: `kvm/<instance>/<purpose>` on an IOASID at a generation. */
export interface HolderReference {
  readonly setId: number;
  readonly ioasid: number;
  readonly generation: number;
  readonly instance: string;
  readonly purpose: string;
}

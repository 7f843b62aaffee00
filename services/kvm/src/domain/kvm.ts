// One class, kept whole (~650 lines): every method reads and changes the same private VM state (the
// VMs, their tables and references, the pending releases), which a split would have to expose; its
// parts without that state live beside it (kvm-kept-entry.ts, vm-snapshot.ts, virtual-machine.ts).
import type { RoleStatePort, StateChange } from "@ioasid/bus";
import { Code, DomainError, isDomainError } from "@ioasid/errors";
import type { CorePort } from "@ioasid/role-kit";
import { getReference, holdsReference, kvmRegistrations, orphanReferences, putReference, registerVm, vmReferences } from "./kvm-core-calls.js";
import { VMCS_PURPOSE, vmInstance, type HolderReference, type RegistrationStatus } from "./holder-reference.js";
import { decodeIa32Pasid, GpCause } from "./ia32-pasid.js";
import { invalidField, kvmError } from "./kvm-error.js";
import { KvmEventType, type KvmEvent, type NotifierPort } from "./kvm-event.js";
import { VmcsClearCause, VmcsUpdateKind, type HistorySink } from "./kvm-history.js";
import { entryChange, restoreVms, vmChange, vmcsKey, vmKey, type KvmKeptEntry } from "./kvm-kept-entry.js";
import { DEFAULT_MAX_RELEASE_ATTEMPTS, type KvmOptions } from "./kvm-options.js";
import { VirtualMachine } from "./virtual-machine.js";
import { vmSnapshot, type VmSnapshot } from "./vm-snapshot.js";

/** Most vCPUs a VM may have (x86 KVM_MAX_VCPUS). */
export const KVM_MAX_VCPUS = 1024;
/** Longest VM name, in characters. */
export const MAX_VM_NAME_LENGTH = 128;

const U64_MAX = (1n << 64n) - 1n;

/** What CreateVm asks for. */
export interface CreateVmSpec {
  /** The VM's MM token (non-zero u64); VFIO creates the VM's set with the same token. */
  readonly mmToken: bigint;
  /** vCPUs; 0 means 1. */
  readonly vcpuCount: number;
  /** For people; may be empty. */
  readonly vmName: string;
}

/** What one ENQCMD did. */
export type EnqcmdResult =
  | { readonly outcome: "TRANSLATED"; readonly gpasid: number; readonly hpasid: number; readonly generation: number }
  | { readonly outcome: "GP"; readonly gpasid: number; readonly cause: GpCause };

/** What DestroyVm did. */
export interface DestroyVmResult {
  readonly clearedEntries: number;
  readonly releasedReferences: number;
}

/** A failure worth retrying (the core unreachable or slow), as opposed to a refusal. */
function isTransient(err: unknown): boolean {
  if (!(err instanceof DomainError)) return true;
  return (
    err.code === Code.UNAVAILABLE ||
    err.code === Code.DEADLINE_EXCEEDED ||
    err.code === Code.CANCELLED ||
    err.code === Code.INTERNAL ||
    err.code === Code.UNKNOWN ||
    err.code === Code.ABORTED
  );
}

function reasonOf(err: unknown): string {
  return err instanceof DomainError ? err.reason : String(err);
}

/**
 * The host's KVM (DESIGN §5 "KVM", ioasid.rst "KVM PASID Translation Table Updates"): VMs, their
 * vCPUs' ENQCMD, and per VM the VMCS PASID translation table, kept in step with the VM's IOASIDs by
 * the IOASID notifier it registers by MM token at CPU priority:
 *
 * - BIND: ioasid_get() (step 6 of the guest life cycle), then install gpasid → hpasid (step 7,
 *   `vmcs_update_atomic()`); a get refused because the IOASID is FREE_PENDING or gone installs
 *   nothing (rule 3);
 * - UNBIND and FREE: remove the entry, then release the reference with the acknowledgement (steps
 *   20–21; 19–20 of the misbehaving-guest table). An UNBIND after FREE finds nothing: harmless;
 * - ENQCMD translates through the VM's own table only; no entry is a #GP, nothing reaches a device;
 * - VM destruction clears the table and drops every reference (rule 4).
 *
 * Handlers are idempotent (deliveries are at least once). The table is this class's state; every
 * I/O goes through the injected ports.
 */
export class Kvm {
  readonly #core: CorePort;
  readonly #notifier: NotifierPort;
  readonly #history: (instance: string) => HistorySink;
  readonly #log: NonNullable<KvmOptions["log"]>;
  readonly #now: () => Date;
  readonly #reapStale: boolean;
  /**
   * Set when a VM went without KVM knowing every reference the core records for it (its set was
   * never learnt, or the core could not be asked): the next {@link retryPendingReleases} releases
   * every `kvm/*` reference of an instance that is not a live VM.
   */
  #sweepOrphans = false;
  readonly #maxReleaseAttempts: number;
  readonly #vms = new Map<number, VirtualMachine>();
  /** MM token → VM, including VMs being created (a second CreateVm with the token is VM_EXISTS). */
  readonly #byToken = new Map<bigint, VirtualMachine>();
  /** References that could not be dropped yet (the core was unreachable), with attempts so far. */
  #pendingReleases: Array<{ ref: HolderReference; attempts: number }> = [];
  #nextVmId = 1;
  #reconciled = false;
  #reconciling: Promise<void> | undefined;
  readonly #store: RoleStatePort<KvmKeptEntry> | undefined;
  /** VMs restored from the store, not yet resubscribed (reconcile does it). */
  readonly #restored: VirtualMachine[] = [];

  constructor(options: KvmOptions) {
    this.#store = options.store;
    this.#core = options.core;
    this.#notifier = options.notifier;
    this.#history = options.history;
    this.#log = options.log ?? (() => undefined);
    this.#now = options.now ?? (() => new Date());
    this.#reapStale = options.reapStale ?? true;
    this.#maxReleaseAttempts = options.maxReleaseAttempts ?? DEFAULT_MAX_RELEASE_ATTEMPTS;
    if (options.saved !== undefined) this.#restore(options.saved);
  }

  /** Takes back the VMs and tables a store kept (a KVM killed with -9 comes back with them). */
  #restore(saved: ReadonlyMap<string, KvmKeptEntry>): void {
    for (const vm of restoreVms(saved, this.#history)) {
      this.#vms.set(vm.vmId, vm);
      this.#byToken.set(vm.mmToken, vm);
      this.#restored.push(vm);
      this.#nextVmId = Math.max(this.#nextVmId, vm.vmId + 1);
    }
  }

  /** Writes changes to the store (before a reply or an acknowledgement). */
  async #write(changes: StateChange<KvmKeptEntry>[]): Promise<void> {
    if (this.#store !== undefined && changes.length > 0) await this.#store.write(changes);
  }
  /** Whether {@link Kvm.reconcile} has completed. */
  get reconciled(): boolean {
    return this.#reconciled;
  }

  /** References still to be dropped (the core was unreachable when KVM let go of them). */
  get pendingReleases(): number {
    return this.#pendingReleases.length;
  }

  /** Whether {@link retryPendingReleases} has work: deferred puts, or a sweep for references of gone VMs. */
  get releaseWorkDue(): boolean {
    return this.#pendingReleases.length > 0 || (this.#sweepOrphans && this.#reapStale && this.#reconciled);
  }

  /**
   * Settles what a previous KVM process left in the core (once; concurrent calls share the work):
   * VM ids continue after the ones its registrations name, and, unless `reapStale` is false, the
   * references its VMs held are dropped and their registrations withdrawn — those VMs died with
   * the process (ioasid.rst rule 4). CreateVm waits for it.
   * @throws DomainError UNAVAILABLE / DEADLINE_EXCEEDED when the core cannot be reached (retry)
   */
  reconcile(): Promise<void> {
    if (this.#reconciled) return Promise.resolve();
    this.#reconciling ??= this.#doReconcile().finally(() => {
      this.#reconciling = undefined;
    });
    return this.#reconciling;
  }

  async #doReconcile(): Promise<void> {
    const all = await kvmRegistrations(this.#core);
    // VMs restored from the store: back to work if the core still has their registration. Each
    // leaves the list only once it is done, so a retry after a failure takes it up again (found by
    // the chaos soak: a VM dropped from the list by a failed attempt was never resubscribed, and
    // the FREE it missed never came).
    while (this.#restored.length > 0) {
      const vm = this.#restored[0]!;
      const r = all.find((x) => x.registrationId === vm.registrationId);
      if (r === undefined) {
        await this.#forget(vm, "its registration is gone from the core");
        this.#restored.shift();
        continue;
      }
      if (r.setId !== 0) vm.setId = r.setId;
      await this.#reconcileVm(vm);
      const subscription = await this.#notifier.subscribe(vm.instance, (event) => this.#onEvent(vm, event));
      this.#restored.shift();
      if (!vm.alive) {
        // Destroyed while it was being reconciled: its subscription must not outlive it.
        await subscription.stop().catch(() => undefined);
        continue;
      }
      vm.subscription = subscription;
      vm.history.record({ $case: "kvmRestoreVm", value: { vmId: vm.vmId, translations: vm.table.size } }, vm.setId === 0 ? {} : { setId: vm.setId });
    }
    const ours = new Set([...this.#vms.values()].map((vm) => vm.registrationId));
    const stale = all.filter((r) => !ours.has(r.registrationId));
    for (const r of stale) {
      const m = /^vm-(\d+)$/.exec(r.instance);
      if (m !== null) this.#nextVmId = Math.max(this.#nextVmId, Number(m[1]) + 1);
    }
    if (this.#reapStale) {
      for (const r of stale) await this.#reap(r);
      // A crash may have lost VMs' changes before they were kept: look once for references no
      // live VM accounts for.
      this.#sweepOrphans = true;
    }
    this.#reconciled = true;
  }

  /**
   * A restored VM against the core: references the core records for it that no entry backs are
   * dropped; entries whose reference the core no longer records (released by an operator) are
   * cleared, so no translation outlives its IOASID (S9). Events missed meanwhile arrive again once
   * it is resubscribed.
   */
  async #reconcileVm(vm: VirtualMachine): Promise<void> {
    if (vm.setId === 0) return;
    const held = await vmReferences(this.#core, vm.setId, vm.instance);
    const backed = new Set<number>();
    for (const ref of held) {
      const mine = vm.refs.get(ref.ioasid);
      if (mine !== undefined && mine.generation === ref.generation && ref.purpose === VMCS_PURPOSE && !backed.has(ref.ioasid)) {
        backed.add(ref.ioasid);
        continue;
      }
      await this.#release(ref);
    }
    const changes: StateChange<KvmKeptEntry>[] = [];
    for (const [hpasid, ref] of [...vm.refs]) {
      if (backed.has(hpasid)) continue;
      vm.refs.delete(hpasid);
      const removed = vm.table.clearHpasid(hpasid, ref.generation);
      if (removed !== undefined) {
        vm.history.record(
          { $case: "vmcsUpdate", value: { kind: VmcsUpdateKind.CLEAR, gpasid: removed.gpasid, hpasid, cause: VmcsClearCause.RECONCILE } },
          { ioasid: hpasid, generation: ref.generation, setId: ref.setId, spid: removed.gpasid },
        );
      }
      changes.push(entryChange(vm, hpasid));
    }
    await this.#write(changes);
  }

  /** Drops a restored VM that cannot come back (its table cleared, its references released). */
  async #forget(vm: VirtualMachine, why: string): Promise<void> {
    vm.alive = false;
    this.#vms.delete(vm.vmId);
    this.#byToken.delete(vm.mmToken);
    const cleared = vm.table.clear();
    const refs = [...vm.refs].map(([ioasid, r]) => ({ setId: r.setId, ioasid, generation: r.generation, instance: vm.instance, purpose: VMCS_PURPOSE }));
    vm.refs.clear();
    await this.#write([{ key: vmKey(vm.vmId), value: undefined }, ...cleared.map((t) => ({ key: vmcsKey(vm.vmId, t.hpasid), value: undefined }))]);
    for (const ref of refs) await this.#release(ref);
    // The core may record more for it than KVM kept (a change lost with the crash).
    this.#sweepOrphans = true;
    this.#log("warn", "a restored VM could not come back", { vmId: vm.vmId, why });
  }

  async #reap(r: RegistrationStatus): Promise<void> {
    let dropped = 0;
    if (r.setId !== 0) {
      for (const ref of await vmReferences(this.#core, r.setId, r.instance)) {
        try {
          await putReference(this.#core, ref);
          dropped++;
        } catch (err) {
          if (isTransient(err)) throw err;
        }
      }
    }
    try {
      await this.#core.unregister(r.registrationId);
    } catch (err) {
      if (!isDomainError(err, "REGISTRATION_NOT_FOUND")) throw err;
    }
    this.#history(r.instance).record(
      { $case: "kvmDestroyVm", value: { earlierRegistration: r.registrationId, dropped } },
      r.setId === 0 ? {} : { setId: r.setId },
    );
    this.#log("info", "reaped a VM of an earlier KVM process", { instance: r.instance, registration: r.registrationId, setId: r.setId, dropped });
  }

  /**
   * Creates a VM and registers its IOASID notifier by MM token at CPU priority, events BIND, UNBIND
   * and FREE (ioasid.rst: "KVM must register IOASID notifier per VM instance during launch time").
   * The registration is PENDING until VFIO creates the set with that token (KVM may start first).
   * @throws DomainError INVALID_ARGUMENT `INVALID_FIELD` (mm_token 0, vcpu_count above
   *   {@link KVM_MAX_VCPUS}, vm_name too long); ALREADY_EXISTS `VM_EXISTS`; FAILED_PRECONDITION
   *   `SET_NOT_EMPTY` (from the core: the set already has IOASIDs); UNAVAILABLE when the core is
   *   unreachable. A refused call leaves no VM, registration or subscription behind.
   */
  async createVm(spec: CreateVmSpec): Promise<VmSnapshot> {
    const { mmToken, vmName } = spec;
    if (mmToken <= 0n || mmToken > U64_MAX)
      throw invalidField("mm_token", "mm_token is required: the VM's MM token, a non-zero u64 (VFIO creates the VM's set with it)");
    const vcpuCount = spec.vcpuCount === 0 ? 1 : spec.vcpuCount;
    if (!Number.isInteger(vcpuCount) || vcpuCount < 1 || vcpuCount > KVM_MAX_VCPUS) {
      throw invalidField("vcpu_count", `vcpu_count ${spec.vcpuCount} is out of range: 1..${KVM_MAX_VCPUS} (0 means 1)`);
    }
    if (vmName.length > MAX_VM_NAME_LENGTH) throw invalidField("vm_name", `vm_name is longer than ${MAX_VM_NAME_LENGTH} characters`);
    this.#assertTokenFree(mmToken);
    await this.reconcile();
    this.#assertTokenFree(mmToken);

    const vmId = this.#nextVmId++;
    const instance = vmInstance(vmId);
    const vm = new VirtualMachine(vmId, instance, mmToken, vmName, vcpuCount, this.#now(), this.#history(instance));
    this.#byToken.set(mmToken, vm);
    try {
      // Subscribe first: once registered on an existing set, the set's events may come at once.
      vm.subscription = await this.#notifier.subscribe(instance, (event) => this.#onEvent(vm, event));
      const registration = await registerVm(this.#core, instance, mmToken);
      vm.registrationId = registration.registrationId;
      if (registration.setId !== 0) vm.setId = registration.setId;
      this.#vms.set(vmId, vm);
      await this.#write([vmChange(vm)]);
      vm.history.record(
        { $case: "kvmCreateVm", value: { mmToken, vcpus: vcpuCount, registration: registration.registrationId, active: registration.active } },
        registration.setId === 0 ? {} : { setId: registration.setId },
      );
      this.#log("info", "VM created", { vmId, mmToken: String(mmToken), registration: registration.registrationId, active: registration.active });
      return this.#snapshot(vm, registration);
    } catch (err) {
      vm.alive = false;
      this.#byToken.delete(mmToken);
      await vm.subscription?.stop().catch(() => undefined);
      // A registration whose answer was lost (timeout) must not outlive the refused call.
      if (isTransient(err)) await this.#withdrawRegistrationOf(instance);
      throw err;
    }
  }

  #assertTokenFree(mmToken: bigint): void {
    const other = this.#byToken.get(mmToken);
    if (other !== undefined) throw kvmError("VM_EXISTS", `VM ${other.vmId} already has MM token ${mmToken}: one VM per address space`);
  }

  async #withdrawRegistrationOf(instance: string): Promise<void> {
    try {
      for (const r of await kvmRegistrations(this.#core)) {
        if (r.instance === instance) await this.#core.unregister(r.registrationId);
      }
    } catch (err) {
      this.#log("warn", "could not check for a registration left by a failed CreateVm", { instance, reason: reasonOf(err) });
    }
  }

  /**
   * Destroys a VM: its notifier registration is withdrawn, every translation is removed, and every
   * reference it holds is dropped (ioasid.rst rule 4: "When KVM terminates before FREE & UNBIND,
   * references will be dropped for all host PASIDs"). The table is cleared before the puts, so no
   * entry outlives its IOASID (S9).
   * @throws DomainError INVALID_ARGUMENT `INVALID_FIELD` (vm_id 0); NOT_FOUND `VM_NOT_FOUND`;
   *   UNAVAILABLE when the core cannot withdraw the registration (the VM is then left as it was)
   */
  async destroyVm(vmId: number): Promise<DestroyVmResult> {
    if (vmId === 0) throw invalidField("vm_id", "vm_id is required");
    const vm = this.#vms.get(vmId);
    if (vm === undefined || vm.destroying) throw kvmError("VM_NOT_FOUND", `no VM ${vmId}`);
    vm.destroying = true;
    try {
      await this.#core.unregister(vm.registrationId);
    } catch (err) {
      if (!isDomainError(err, "REGISTRATION_NOT_FOUND")) {
        vm.destroying = false;
        throw err;
      }
    }
    await vm.subscription?.stop().catch((err: unknown) => this.#log("warn", "stopping the VM's subscription failed", { vmId, reason: reasonOf(err) }));

    // From here on the VM is gone: a handler still in flight sees `alive` false and keeps nothing.
    vm.alive = false;
    this.#vms.delete(vmId);
    this.#byToken.delete(vm.mmToken);
    const cleared = vm.table.clear();
    for (const t of cleared) {
      vm.history.record(
        { $case: "vmcsUpdate", value: { kind: VmcsUpdateKind.CLEAR, gpasid: t.gpasid, hpasid: t.hpasid, cause: VmcsClearCause.VM_DESTROYED } },
        { ioasid: t.hpasid, generation: t.generation, setId: vm.refs.get(t.hpasid)?.setId ?? vm.setId, spid: t.gpasid },
      );
    }
    const refs = [...vm.refs].map(([ioasid, r]) => ({ setId: r.setId, ioasid, generation: r.generation, instance: vm.instance, purpose: VMCS_PURPOSE }));
    const keys = new Set([...refs.map((r) => r.ioasid), ...cleared.map((t) => t.hpasid)]);
    vm.refs.clear();
    await this.#write([{ key: vmKey(vm.vmId), value: undefined }, ...[...keys].map((h) => ({ key: vmcsKey(vm.vmId, h), value: undefined }))]).catch(
      (err: unknown) => this.#log("warn", "could not forget the destroyed VM in the store", { vmId, reason: reasonOf(err) }),
    );
    // What the core records for this VM is what goes, not only what KVM remembers holding: a release
    // sent with an acknowledgement the core lost (it crashed before keeping it) is not redelivered
    // once the VM's registration is gone (found by the chaos soak, seed 1: a FREE's release lost
    // with a core kill, the VM destroyed, the IOASID never reclaimed).
    let toRelease: HolderReference[] = refs;
    if (vm.setId !== 0) {
      try {
        toRelease = await vmReferences(this.#core, vm.setId, vm.instance);
      } catch (err) {
        this.#sweepOrphans = true;
        this.#log("warn", "could not ask the core what a destroyed VM holds: releasing what KVM remembers, the rest later", { vmId, reason: reasonOf(err) });
      }
    } else {
      // Its set was never learnt (a restart lost it before it was kept): the sweep finds its references.
      this.#sweepOrphans = true;
    }
    const released = await Promise.all(toRelease.map((ref) => this.#release(ref)));
    const releasedReferences = released.filter(Boolean).length;
    vm.history.record({ $case: "kvmDestroyVm", value: { cleared: cleared.length, dropped: releasedReferences } }, vm.setId === 0 ? {} : { setId: vm.setId });
    this.#log("info", "VM destroyed", { vmId, cleared: cleared.length, released: releasedReferences, deferred: toRelease.length - releasedReferences });
    return { clearedEntries: cleared.length, releasedReferences };
  }

  /**
   * Destroys every VM (KVM shutting down: its VMs die with it). Failures are logged; what could
   * not be dropped is left for the next start's {@link Kvm.reconcile}.
   */
  async destroyAll(): Promise<void> {
    // In parallel: shutdown waits for one round of core calls, not one per VM.
    await Promise.all(
      [...this.#vms.keys()].map((vmId) =>
        this.destroyVm(vmId).catch((err: unknown) => this.#log("warn", "could not destroy a VM at shutdown", { vmId, reason: reasonOf(err) })),
      ),
    );
  }

  /**
   * One ENQCMD by a vCPU: the guest PASID in IA32_PASID is translated through this VM's VMCS PASID
   * translation table only. Invalid IA32_PASID or no entry raises #GP in the guest and nothing is
   * submitted (ioasid.rst: "The fault will be reported to the user if PASID used in the ENQCMD is
   * not set up in VMCS PASID translation table"). Changes nothing; recorded as "enqcmd".
   * @throws DomainError INVALID_ARGUMENT `INVALID_FIELD` (vm_id 0), `VCPU_OUT_OF_RANGE`; NOT_FOUND `VM_NOT_FOUND`
   */
  enqcmd(vmId: number, vcpu: number, ia32Pasid: number): EnqcmdResult {
    if (vmId === 0) throw invalidField("vm_id", "vm_id is required");
    const vm = this.#vms.get(vmId);
    if (vm === undefined) throw kvmError("VM_NOT_FOUND", `no VM ${vmId}`);
    if (!Number.isInteger(vcpu) || vcpu < 0 || vcpu >= vm.vcpuCount) {
      throw kvmError("VCPU_OUT_OF_RANGE", `VM ${vmId} has vCPUs 0..${vm.vcpuCount - 1}; there is no vCPU ${vcpu}`);
    }
    const decoded = decodeIa32Pasid(ia32Pasid);
    let result: EnqcmdResult;
    if (!decoded.ok) {
      result = { outcome: "GP", gpasid: decoded.gpasid, cause: decoded.cause };
    } else {
      const t = vm.table.translate(decoded.gpasid);
      result =
        t === undefined
          ? { outcome: "GP", gpasid: decoded.gpasid, cause: GpCause.NO_TRANSLATION }
          : { outcome: "TRANSLATED", gpasid: decoded.gpasid, hpasid: t.hpasid, generation: t.generation };
    }
    vm.history.record(
      {
        $case: "enqcmd",
        value:
          result.outcome === "TRANSLATED"
            ? { vcpu, ia32Pasid: ia32Pasid >>> 0, translated: true, gpasid: result.gpasid, hpasid: result.hpasid }
            : { vcpu, ia32Pasid: ia32Pasid >>> 0, translated: false, gpasid: result.gpasid, gpCause: String(result.cause) },
      },
      {
        spid: result.gpasid,
        ...(vm.setId === 0 ? {} : { setId: vm.setId }),
        ...(result.outcome === "TRANSLATED" ? { ioasid: result.hpasid, generation: result.generation } : {}),
      },
    );
    return result;
  }

  /**
   * One VM (`vmId` ≠ 0) or every VM, ascending by id, with their tables; the registration state
   * comes from the core (it turns ACTIVE when VFIO creates the set, without an event to KVM).
   * @throws DomainError NOT_FOUND `VM_NOT_FOUND`; UNAVAILABLE when the core is unreachable
   */
  async queryState(vmId: number): Promise<VmSnapshot[]> {
    let selected: VirtualMachine[];
    if (vmId !== 0) {
      const vm = this.#vms.get(vmId);
      if (vm === undefined) throw kvmError("VM_NOT_FOUND", `no VM ${vmId}`);
      selected = [vm];
    } else {
      selected = [...this.#vms.values()].sort((a, b) => a.vmId - b.vmId);
    }
    if (selected.length === 0) return [];
    const registrations = new Map((await kvmRegistrations(this.#core)).map((r) => [r.registrationId, r]));
    return selected.map((vm) => this.#snapshot(vm, registrations.get(vm.registrationId)));
  }

  /**
   * Tries again to drop the references the core could not take back earlier (call it
   * periodically). One that still fails after `maxReleaseAttempts` is reported leaked.
   * @returns references still pending
   */
  async retryPendingReleases(): Promise<number> {
    if (this.#sweepOrphans && this.#reapStale && this.#reconciled) await this.#sweep();
    const batch = this.#pendingReleases;
    this.#pendingReleases = [];
    for (const p of batch) {
      try {
        await putReference(this.#core, p.ref);
        this.#log("info", "deferred reference dropped", { ...p.ref });
      } catch (err) {
        if (!isTransient(err)) continue;
        if (p.attempts + 1 >= this.#maxReleaseAttempts) {
          this.#log("error", "reference could not be dropped: leaked until an operator releases it", { ...p.ref, reason: reasonOf(err) });
        } else {
          this.#pendingReleases.push({ ref: p.ref, attempts: p.attempts + 1 });
        }
      }
    }
    return this.#pendingReleases.length;
  }

  /**
   * Releases every `kvm/*` reference the core records for an instance that is not a live VM: only
   * KVM takes them, so they belong to VMs that are gone (found by the chaos suite, seed 9: a KVM
   * that fail-stopped before keeping a VM's set came back, the VM was destroyed, and the reference
   * its BIND took was never dropped — the crashed guest's IOASID stayed FREE_PENDING).
   */
  async #sweep(): Promise<void> {
    let orphans: HolderReference[];
    try {
      orphans = await orphanReferences(this.#core, new Set([...this.#vms.values()].map((vm) => vm.instance)));
    } catch (err) {
      this.#log("warn", "could not look for references of gone VMs yet", { reason: reasonOf(err) });
      return;
    }
    this.#sweepOrphans = false;
    for (const ref of orphans) {
      // A VM created since the listing is live and keeps what it holds.
      if ([...this.#vms.values()].some((vm) => vm.instance === ref.instance)) continue;
      if (await this.#release(ref)) {
        this.#history(ref.instance).record(
          { $case: "kvmOrphanRelease", value: { purpose: ref.purpose } },
          { ioasid: ref.ioasid, generation: ref.generation, setId: ref.setId },
        );
        this.#log("info", "released a reference of a gone VM", { ...ref });
      }
    }
  }

  /**
   * ioasid_put() of a reference KVM lets go of. Refusals (already dropped, IOASID gone) count as
   * done; when the core is unreachable the put is kept for {@link Kvm.retryPendingReleases}.
   * @returns whether the reference was dropped now
   */
  async #release(ref: HolderReference): Promise<boolean> {
    try {
      await putReference(this.#core, ref);
      return true;
    } catch (err) {
      if (isTransient(err)) {
        this.#pendingReleases.push({ ref, attempts: 1 });
        this.#log("warn", "reference drop deferred: the core is unreachable", { ...ref, reason: reasonOf(err) });
      } else {
        this.#log("warn", "reference drop refused (nothing to drop)", { ...ref, reason: reasonOf(err) });
      }
      return false;
    }
  }

  #snapshot(vm: VirtualMachine, registration: RegistrationStatus | undefined): VmSnapshot {
    if (registration === undefined) this.#log("warn", "the core has no registration for a VM", { vmId: vm.vmId, registration: vm.registrationId });
    return vmSnapshot(vm, registration);
  }

  /** The notifier callback of one VM (kvm_nb_handler). */
  async #onEvent(vm: VirtualMachine, event: KvmEvent): Promise<{ release?: readonly string[] }> {
    if (!vm.alive) return {}; // destroyed: DestroyVm dropped everything; nothing to hold or release
    if (event.setId !== 0) vm.setId = event.setId;
    switch (event.type) {
      case KvmEventType.BIND:
        return this.#onBind(vm, event);
      case KvmEventType.UNBIND:
      case KvmEventType.FREE:
        return this.#onUnbindOrFree(vm, event);
      default:
        return {};
    }
  }

  /**
   * BIND: ioasid_get() (step 6, "-> ioasid_get() 3"), then gpasid → hpasid into the table (step 7,
   * "-> vmcs_update_atomic()"). Idempotent: a redelivered BIND whose reference is held only makes
   * sure the entry is there.
   */
  async #onBind(vm: VirtualMachine, e: KvmEvent): Promise<{ release?: readonly string[] }> {
    if (e.spid === 0) {
      this.#log("warn", "BIND without a guest PASID ignored", { vmId: vm.vmId, ioasid: e.ioasid, seq: String(e.seq) });
      return {};
    }
    let refcount: number | undefined;
    const held = vm.refs.get(e.ioasid);
    if (held === undefined || held.generation !== e.generation) {
      const current = vm.table.translate(e.spid);
      if (current !== undefined && current.bindSeq > e.seq) {
        // A later BIND of this guest PASID was handled first (events of different IOASIDs are
        // ordered independently): this mapping is already dead, so take nothing.
        return {};
      }
      const ref = { setId: e.setId, ioasid: e.ioasid, generation: e.generation, instance: vm.instance, purpose: VMCS_PURPOSE };
      const key = `${e.ioasid}:${e.generation}`;
      // A get that timed out may have been applied: ask before taking a second reference.
      let alreadyHeld = vm.uncertainGets.has(key) ? await holdsReference(this.#core, ref) : false;
      if (!alreadyHeld) {
        try {
          refcount = await getReference(this.#core, ref);
          alreadyHeld = true;
        } catch (err) {
          if (isTransient(err)) {
            vm.uncertainGets.add(key);
            throw err; // missed: redelivered later, in order
          }
          // ioasid.rst rule 3: once the IOASID is FREE(_PENDING) "KVM will see error in
          // ioasid_get()"; the FREE (or nothing, if reclaimed) follows. No reference, no entry.
          vm.uncertainGets.delete(key);
          this.#log("info", "BIND not installed: ioasid_get() refused", { vmId: vm.vmId, ioasid: e.ioasid, generation: e.generation, reason: reasonOf(err) });
          return {};
        }
      }
      vm.uncertainGets.delete(key);
      if (!vm.alive) {
        // Destroyed while the get was in flight: DestroyVm could not see this reference.
        await this.#release(ref);
        return {};
      }
      vm.refs.set(e.ioasid, { setId: e.setId, generation: e.generation });
    }
    const outcome = vm.table.install({ gpasid: e.spid, hpasid: e.ioasid, generation: e.generation, bindSeq: e.seq, installedAt: this.#now() });
    if (outcome.kind === "installed") {
      // The history records the table change when it happens (a VM destroyed while it is being
      // kept must not show its clear before this install); the store keeps it before the ack.
      const kept = [entryChange(vm, e.ioasid), ...outcome.replaced.map((r) => entryChange(vm, r.hpasid))];
      for (const r of outcome.replaced) {
        vm.history.record(
          { $case: "vmcsUpdate", value: { kind: VmcsUpdateKind.CLEAR, gpasid: r.gpasid, hpasid: r.hpasid, cause: VmcsClearCause.REPLACED } },
          { ioasid: r.hpasid, generation: r.generation, setId: e.setId, spid: r.gpasid, seq: Number(e.seq) },
        );
      }
      vm.history.record(
        { $case: "vmcsUpdate", value: { kind: VmcsUpdateKind.INSTALL, gpasid: e.spid, hpasid: e.ioasid } },
        { ioasid: e.ioasid, generation: e.generation, setId: e.setId, spid: e.spid, seq: Number(e.seq), ...(refcount === undefined ? {} : { refcount }) },
      );
      await this.#write(kept);
    }
    return {};
  }

  /**
   * UNBIND (steps 20–21) and FREE (misbehaving-guest steps 18–20): remove the entry translating to
   * this host PASID, then release the `vmcs` reference with the acknowledgement. Idempotent: an
   * UNBIND after FREE (or a redelivery) finds nothing and releases nothing.
   */
  async #onUnbindOrFree(vm: VirtualMachine, e: KvmEvent): Promise<{ release?: readonly string[] }> {
    const removed = vm.table.clearHpasid(e.ioasid, e.generation);
    if (removed !== undefined) {
      vm.history.record(
        {
          $case: "vmcsUpdate",
          value: {
            kind: VmcsUpdateKind.CLEAR,
            gpasid: removed.gpasid,
            hpasid: e.ioasid,
            cause: e.type === "FREE" ? VmcsClearCause.FREE : VmcsClearCause.UNBIND,
          },
        },
        { ioasid: e.ioasid, generation: e.generation, setId: e.setId, spid: removed.gpasid, seq: Number(e.seq) },
      );
    }
    const held = vm.refs.get(e.ioasid);
    if (held === undefined || held.generation !== e.generation) {
      if (removed !== undefined) await this.#write([entryChange(vm, e.ioasid)]);
      return {};
    }
    vm.refs.delete(e.ioasid);
    // Kept cleared before the reference goes with the acknowledgement.
    await this.#write([entryChange(vm, e.ioasid)]);
    return { release: [VMCS_PURPOSE] };
  }
}

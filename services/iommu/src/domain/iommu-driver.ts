// Kept whole (issue 12: one cohesive thing, ~930 lines): every operation here runs the same
// protocol with the core under the same per-PASID / per-mm locks (check the generation, take the
// "bind" reference, attach the SPID, undo on failure, release with the FREE's acknowledgement), and
// cutting it would scatter that protocol; the fault path is cut out to dma-faults.ts.
import { Code, DomainError, isDomainError } from "@ioasid/errors";
import { coreError, EventType, IoasidState, TokenType, type Holder, type IoasidEvent, type IoasidInfo, type SetInfo } from "@ioasid/ioasid";
import type { HandlerResult, HistoryActionInput, HistoryActionValue, HistoryFields } from "@ioasid/bus";
import type { CorePort } from "@ioasid/role-kit";
import { iommuError, invalidField, isGone } from "./iommu-errors.js";
import { DmaFaults, type DmaOutcome, type FaultCounters, type PageRequestHint } from "./dma-faults.js";
import {
  AttachKind,
  MAX_PASIDS,
  RID_PASID,
  type AttachDomainSpec,
  type AttachHandle,
  type DetachDomainSpec,
  type DeviceSpec,
  type DeviceView,
  type Domain,
  type DomainSpec,
  type GpasidBinding,
  type HardwareChange,
  type IommuHardware,
  type IommuSnapshot,
  type Mapping,
  type MmContext,
  type ReplaceDomainSpec,
  type Replaced,
  type SvaBond,
  type IommuKeptEntry,
  type TranslateSpec,
} from "./iommu-hardware.js";
import type { FaultHandlers, FaultItem } from "./fault-handlers.js";
import { PageRequestQueue, ResponseSource, type FaultGroup, type PageResponseCode } from "./page-requests.js";
import { KeyedMutex } from "@ioasid/role-kit";
import { FailNthOperation, noFailures, type FailNth } from "./fail-nth.js";
import { ViommuTable, type Vdevice, type Veventq, type VeventqItem, type VeventqType, type Viommu, type ViommuHardwareView } from "./viommu.js";
import type { RoleStatePort, StateChange } from "@ioasid/bus";

/**
 * A history step as the IOMMU records it: the catalogue's action, except that the notifier
 * handler's event type is the domain's ("FREE"), not the wire enum (DESIGN §2: domain code knows
 * no proto); the history adapter (`adapters/iommu-history.ts`) writes it in the catalogue's words.
 */
export type IommuHistoryAction =
  | Exclude<HistoryActionInput, { readonly $case: "iommuNbHandler" }>
  | { readonly $case: "iommuNbHandler"; readonly value: Omit<Partial<HistoryActionValue<"iommuNbHandler">>, "type"> & { readonly type: EventType } };

/** Where the IOMMU records its history steps (a bus HistoryRecorder behind `iommuHistoryPort` is one). */
export interface IommuHistoryPort {
  record(action: IommuHistoryAction, fields?: HistoryFields): void;
}

/** An IOASID event as the IOMMU's notifier handler reads it (the bus handler converts the delivered one). */
export type IommuEvent = Pick<IoasidEvent, "seq" | "type" | "ioasid" | "generation" | "spid" | "setId">;

/** Where the IOMMU reports what it cannot return to a caller (a pino logger is one). */
export interface IommuLog {
  warn(fields: object, message: string): void;
}

export type { DmaOutcome, FaultCounters, PageRequestHint } from "./dma-faults.js";

/** Options of {@link IommuDriver}. */
export interface IommuDriverOptions {
  readonly hardware: IommuHardware;
  /** The IOASID core (the roles' one port: the gRPC one in the service, `InProcessCore` in tests). */
  readonly core: CorePort;
  readonly history?: IommuHistoryPort;
  readonly log?: IommuLog;
  /** This IOMMU's instance ("dmar0"): the holder instance of its references. */
  readonly instance: string;
  /** How long a fault group may stay unanswered before it is answered INVALID, ms. @default 10000 */
  readonly faultTimeoutMs?: number;
  /**
   * Where the hardware tables and outstanding fault groups are kept so they survive a crash (a
   * RoleState in JetStream); see {@link IommuDriver.persist}. @default not kept
   */
  readonly store?: RoleStatePort<IommuKeptEntry>;
  /** What the store held at start: outstanding fault groups come back (pass the hardware restored too). */
  readonly saved?: ReadonlyMap<string, IommuKeptEntry>;
  /**
   * Failure injection (tests only: IOASID_IOMMU_FAULT_INJECTION=1): InjectFailure arms it.
   * @default none — InjectFailure is refused with FAULT_INJECTION_DISABLED
   */
  readonly failNth?: FailNth;
}

/** Default of {@link IommuDriverOptions.faultTimeoutMs}. */
export const DEFAULT_FAULT_TIMEOUT_MS = 10_000;

/** The largest SPID (guest PASID): 20 bits. */
export const MAX_SPID = (1 << 20) - 1;

/** Purpose of the reference the IOMMU holds on a guest-bound IOASID (holder iommu/<instance>/bind). */
export const BIND_PURPOSE = "bind";

/** One bind_gpasid. */
export interface BindGpasidSpec {
  readonly setId: number;
  readonly hpasid: number;
  /** 0 = unchecked. */
  readonly generation: number;
  readonly gpasid: number;
  readonly deviceId: string;
  readonly guestPgtable: bigint;
  /** 0 = the PAGING domain attached to the device's requests without PASID. */
  readonly parentDomainId: number;
  readonly owner: string;
  readonly ownerData: Uint8Array;
}

/** One unbind_gpasid. */
export interface UnbindGpasidSpec {
  readonly setId: number;
  readonly hpasid: number;
  /** 0 = unchecked. */
  readonly generation: number;
  /** 0 = not checked. */
  readonly gpasid: number;
  readonly deviceId: string;
}

/** What an unbind did. */
export interface UnbindResult {
  /** False when nothing was bound (e.g. the FREE teardown came first). */
  readonly unbound: boolean;
  /** True when it was the last device: the SPID was detached (the core emitted UNBIND). */
  readonly lastUnbind: boolean;
  /** Fault groups of the handle answered INVALID. */
  readonly answeredFaultGroups: number;
}

/** One native SVA bind. */
export interface SvaBindSpec {
  readonly deviceId: string;
  readonly mmToken: bigint;
  readonly owner: string;
  readonly ownerData: Uint8Array;
}

const HOLDER_ROLE = "iommu";
const pasidKey = (pasid: number) => `pasid:${pasid}`;
const mmKey = (mmToken: bigint) => `mm:${mmToken}`;

/**
 * The set with this token (the core's GetSet by token): the port names sets by id, so it is found
 * among every set.
 * @throws DomainError NOT_FOUND `SET_NOT_FOUND` when there is none
 */
async function setByToken(core: CorePort, token: SetInfo["token"]): Promise<SetInfo> {
  const set = (await core.listSets()).find((s) => s.token.type === token.type && s.token.value === token.value);
  if (set === undefined) throw coreError("SET_NOT_FOUND", `no IOASID set with token ${token.type} ${token.value}`);
  return set;
}

/** A call whose outcome is unknown: the core may or may not have applied it. */
const isIndeterminate = (err: unknown) =>
  !(err instanceof DomainError) ||
  err.code === Code.UNAVAILABLE ||
  err.code === Code.DEADLINE_EXCEEDED ||
  err.code === Code.CANCELLED ||
  err.code === Code.UNKNOWN;

/**
 * The VT-d driver (intel-svm, attach handles) over the modelled hardware: every operation that
 * involves IOASIDs goes through the core — ownership checks, the "bind" reference, SPID
 * attach/detach (which make the core emit BIND/UNBIND), the mm's PASID — and serialises per host
 * PASID, so a bind, an unbind and a FREE teardown of one IOASID never interleave while IOASIDs are
 * handled in parallel. A failed call changes nothing: core steps taken before a later step fails
 * are undone.
 */
export class IommuDriver {
  readonly hw: IommuHardware;
  /** The owners' fault-handler streams. */
  readonly faults: FaultHandlers;
  readonly #core: CorePort;
  readonly #history: IommuHistoryPort | undefined;
  readonly #log: IommuLog | undefined;
  readonly #holder: Holder;
  readonly #locks = new KeyedMutex();
  /** The page-request queue (fault groups). */
  readonly prq: PageRequestQueue;
  readonly counters: FaultCounters;
  /** The fault path: translations, page-request groups, page responses, fault records. */
  readonly #dma: DmaFaults;
  readonly #store: RoleStatePort<IommuKeptEntry> | undefined;
  readonly #failNthControl: FailNth | undefined;
  readonly #failNth: Pick<FailNth, "begin">;
  /** The store write in flight (or the last one), settled or not. */
  #persisting: Promise<void> = Promise.resolve();
  /** The next write, not started yet: every persist() made meanwhile joins it. */
  #nextWrite: Promise<void> | undefined;
  /** The vIOMMU objects (iommufd model, DESIGN §5): vIOMMUs, vdevices, vEVENTQs. */
  readonly viommus: ViommuTable;

  /**
   * Writes what changed in the hardware tables and the fault groups to the store. The service
   * calls it before it answers a call and before it acknowledges an event, so what a caller was
   * told, or what the core was told was torn down, survives a crash.
   *
   * Group commit (issue 15: "one store write per batch, not per entry"): writes are chained, one in
   * flight at a time, in order; a persist() made while one is in flight joins the next write, which
   * takes every change made until it starts. A delivery batch of 64 FREEs is then two writes, not 64
   * in a row (the crashed-guest bench spent 33 of its 80 ms in that chain). A caller whose changes
   * an earlier write took still waits for that write: the next one starts only after it.
   */
  persist(): Promise<void> {
    const store = this.#store;
    if (store === undefined) {
      this.#takeChanges();
      return this.#persisting;
    }
    this.#nextWrite ??= this.#persisting
      .catch(() => undefined)
      .then(() => {
        this.#nextWrite = undefined;
        const changes = this.#takeChanges();
        return changes.length === 0 ? undefined : store.write(changes);
      });
    this.#persisting = this.#nextWrite;
    return this.#nextWrite;
  }

  #takeChanges(): StateChange<IommuKeptEntry>[] {
    return [...this.hw.takeChanges(), ...this.prq.takeChanges(), ...this.viommus.takeChanges()];
  }

  constructor(options: IommuDriverOptions) {
    const timeoutMs = options.faultTimeoutMs ?? DEFAULT_FAULT_TIMEOUT_MS;
    this.prq = options.saved === undefined ? new PageRequestQueue({ timeoutMs }) : PageRequestQueue.restore(options.saved, { timeoutMs });
    this.#store = options.store;
    this.#failNthControl = options.failNth;
    this.#failNth = options.failNth ?? noFailures;
    this.viommus = options.saved === undefined ? new ViommuTable() : ViommuTable.restore(options.saved);
    this.hw = options.hardware;
    this.#core = options.core;
    this.#history = options.history;
    this.#log = options.log;
    this.#holder = { role: HOLDER_ROLE, instance: options.instance, purpose: BIND_PURPOSE };
    this.#dma = new DmaFaults({
      hw: this.hw,
      prq: this.prq,
      core: this.#core,
      record: (action, fields) => this.#record(action, fields),
      log: this.#log,
      persist: () => this.persist(),
      // A reported fault under a nested domain of a vIOMMU also goes to the VM's vEVENTQ, kept at
      // once: a report made after the IOASID check answers after the Translate call was kept, and
      // an event lost in a crash would hand its sequence number out again.
      onFaultReported: (record, handle) => {
        if (this.viommus.reportFault(handle.domainId, record) === undefined) return;
        this.persist().catch((err: unknown) => this.#log?.warn({ err }, "keeping a vEVENTQ failed"));
      },
    });
    this.faults = this.#dma.faults;
    this.counters = this.#dma.counters;
  }

  // ---- restart ----

  /**
   * Takes back, after a restart, the "bind" references this IOMMU instance still holds in the core
   * (its PASID tables were lost with the process; the core's references were not). Each becomes a
   * bind state with no device: the IOASID's FREE then releases it with the acknowledgement, its
   * next unbind detaches the SPID (UNBIND) but keeps the reference for that FREE, and a new bind of
   * the same guest PASID reuses it without a second BIND. Call it before the bus subscriber starts,
   * so no FREE finds nothing.
   * @returns how many references were taken back
   */
  async adoptHeldReferences(): Promise<number> {
    const sets = await this.#core.listSets();
    let adopted = 0;
    for (const set of sets) {
      const ioasids = await this.#core.listIoasids(set.id);
      for (const info of ioasids) {
        const held = this.#recordsBindReference(info);
        if (!held || this.hw.binding(info.ioasid) !== undefined) continue;
        const b = this.hw.createBinding({ hpasid: info.ioasid, setId: info.setId, generation: info.generation, gpasid: info.spid });
        b.refHeld = true;
        b.spidAttached = info.spid !== 0;
        adopted++;
        this.#record({ $case: "bindAdopted", value: { keptWithoutReference: false } }, this.#bindFields(b));
      }
    }
    return adopted;
  }

  /**
   * After a restart with tables restored from the store: every guest bind and IOASID-owned entry is
   * checked against the core. A bind reference the core still records for this instance stays (a
   * missing bind state is adopted, as {@link adoptHeldReferences}); a bind state whose reference the
   * core no longer records (released by an operator, or its IOASID reclaimed meanwhile), and an
   * entry attached for an IOASID generation that no longer exists, are torn down, so no PASID stays
   * live in a table after its IOASID was reclaimed (S9). FREE events missed while down arrive again.
   * @returns bind references adopted, bind states and entries torn down
   */
  async reconcile(): Promise<{ adopted: number; tornDown: number }> {
    const held = new Map<number, IoasidInfo>();
    const sets = await this.#core.listSets();
    for (const set of sets) {
      const ioasids = await this.#core.listIoasids(set.id);
      for (const info of ioasids) {
        if (this.#recordsBindReference(info)) {
          held.set(info.ioasid, info);
        }
      }
    }
    let tornDown = 0;
    let adoptedHere = 0;
    for (const b of this.hw.bindings()) {
      const info = held.get(b.hpasid);
      if (info !== undefined && info.generation === b.generation) {
        // The core records the reference: it is this bind's, whatever the kept state says (a
        // crash between the core's get and keeping refHeld; chaos seed 2, where the FREE then
        // released nothing and the crashed guest's IOASID stayed FREE_PENDING).
        if (!b.refHeld) {
          b.refHeld = true;
          adoptedHere++;
          this.#record({ $case: "bindAdopted", value: { keptWithoutReference: true } }, this.#bindFields(b));
        }
        continue;
      }
      // Not held any more (or another generation now): nothing of this bind may stay programmed.
      const { result, changes } = this.hw.teardownIoasid(b.hpasid, b.generation);
      this.#recordChanges(changes);
      b.refHeld = false;
      b.spidAttached = false;
      this.hw.deleteBinding(b.hpasid);
      tornDown += result.length + 1;
      this.#record({ $case: "bindDropped", value: {} }, this.#bindFields(b));
    }
    // IOASID-owned entries (checked attachments, SVA bonds) of a generation that is gone.
    for (const h of this.hw.snapshot([], 0).handles) {
      if (h.generation === 0 || h.kind === AttachKind.GPASID_BIND) continue;
      let live: boolean;
      try {
        live = (await this.#core.describe(h.pasid))?.generation === h.generation;
      } catch (err) {
        if (!isGone(err)) throw err;
        live = false;
      }
      if (live) continue;
      const { result, changes } = this.hw.teardownIoasid(h.pasid, h.generation);
      this.#recordChanges(changes);
      for (const mm of this.hw.mmsWithPasid(h.pasid)) if (mm.generation === h.generation) this.hw.deleteMm(mm.mmToken);
      tornDown += result.length;
    }
    const adopted = adoptedHere + (await this.adoptHeldReferences());
    this.#dma.armTimer();
    await this.persist();
    return { adopted, tornDown };
  }

  // ---- devices and domains ----

  /** Plugs a device in (see {@link IommuHardware.registerDevice}). */
  registerDevice(spec: DeviceSpec): DeviceView {
    const dev = this.hw.registerDevice(spec);
    this.#record({ $case: "iommuProbeDevice", value: { device: dev.deviceId, function: dev.function, maxPasids: dev.maxPasids, iommuGroup: dev.iommuGroup } });
    return dev;
  }

  /**
   * Unplugs a device: its handles are torn down, and the guest binds it was the last device of
   * detach their SPID (UNBIND) and — unlike a guest's last unbind, which leaves it to the FREE —
   * put their reference at once.
   * @returns how many handles were torn down
   */
  async removeDevice(deviceId: string): Promise<{ handles: number; answeredFaultGroups: number }> {
    const { result: torn, changes } = this.hw.removeDevice(deviceId);
    this.#recordChanges(changes);
    // Its vdevices go with it (their nested attachments were just torn down).
    this.viommus.removeDevice(deviceId);
    // Entries gone first (no new request can arrive). Partial groups (their last request never came)
    // are freed without a response, as io-pgfault does since v6.9 (iopf_queue_remove_device): only a
    // complete group is answered, and it is answered INVALID.
    this.prq.discardPartialWhere((g) => g.deviceId === deviceId);
    const answered = this.#dma.answered(this.prq.answerWhere((g) => g.deviceId === deviceId, ResponseSource.DEVICE_REMOVED));
    this.prq.forgetDevice(deviceId);
    this.#record({ $case: "iommuReleaseDevice", value: { device: deviceId, handles: torn.length, answeredFaultGroups: answered } });
    const binds = torn.filter((h) => h.kind === AttachKind.GPASID_BIND);
    await Promise.all(
      binds.map((h) =>
        this.#locks
          .run(pasidKey(h.pasid), async () => {
            const b = this.hw.binding(h.pasid);
            if (b !== undefined && b.generation === h.generation) await this.#releaseIfUnused(b);
          })
          // The device is gone whatever the core says; an unfinished SPID detach is completed by
          // the IOASID's next unbind or its FREE, an unfinished put by its FREE only.
          .catch((err: unknown) => this.#log?.warn({ err, ioasid: h.pasid, deviceId }, "release after device removal failed")),
      ),
    );
    return { handles: torn.length, answeredFaultGroups: answered };
  }

  /**
   * Creates a domain; a NESTED one may be allocated on a vIOMMU (`viommuId`), whose parent it then
   * nests under.
   */
  createDomain(spec: DomainSpec, viommuId = 0): Domain {
    const onViommu = viommuId === 0 ? spec : { ...spec, parentDomainId: this.viommus.nestedParent(viommuId, spec.type, spec.parentDomainId) };
    const d = this.hw.createDomain(onViommu);
    if (viommuId !== 0) this.viommus.addNestedDomain(viommuId, d.domainId);
    this.#record({ $case: "domainAlloc", value: { domain: d.domainId, domainType: d.type } });
    return d;
  }

  /** Destroys an unused domain. */
  freeDomain(domainId: number): void {
    if (domainId !== 0 && this.hw.domain(domainId) !== undefined) this.viommus.assertDomainFreeable(domainId);
    this.hw.freeDomain(domainId);
    this.viommus.forgetDomain(domainId);
    this.#record({ $case: "domainFree", value: { domain: domainId } });
  }

  // ---- attach handles ----

  /**
   * Attaches a domain at a PASID (or without PASID). With a generation, the PASID must be that
   * generation of an allocated, ACTIVE IOASID; the entry is then the IOASID's, torn down by its FREE.
   * @throws see {@link IommuHardware.attachDomain}; STALE_GENERATION, IOASID_NOT_FOUND, IOASID_FREE_PENDING
   */
  async attachDomain(spec: AttachDomainSpec): Promise<AttachHandle> {
    if (spec.withoutPasid && spec.generation !== 0) throw invalidField("generation", "a generation names an IOASID: not with without_pasid");
    const fail = this.#failNth.begin(FailNthOperation.ATTACH);
    this.hw.checkAttachDomain(spec);
    this.viommus.checkNestedAttach(spec.domainId, spec.deviceId);
    const attach = () => {
      this.viommus.checkNestedAttach(spec.domainId, spec.deviceId);
      fail.point("alloc-handle");
      const { result, changes } = this.hw.attachDomain(spec);
      this.#recordChanges(changes);
      this.#record(
        spec.withoutPasid ? { $case: "attachDevice", value: this.#handleStep(result) } : { $case: "attachDevicePasid", value: this.#handleStep(result) },
        this.#handleFields(result),
      );
      return result;
    };
    if (spec.withoutPasid || spec.generation === 0) return attach();
    return this.#locks.run(pasidKey(spec.pasid), async () => {
      fail.point("core-describe");
      await this.#checkGeneration(spec.pasid, spec.generation);
      return attach();
    });
  }

  /**
   * Replaces the domain of an AttachDomain attachment in one step (iommufd replace; DESIGN §5
   * "iommufd model"): the new handle is installed over the old, the old domain flushed for the
   * target, and the old handle's outstanding fault groups answered INVALID (source REPLACE). An
   * attachment of an IOASID generation stays that generation's (its FREE tears it down): the
   * IOASID must still be ACTIVE, as for an attach. A failed replace changes nothing.
   * @returns what was replaced, and how many fault groups were answered
   * @throws see {@link IommuHardware.replaceDomain}; STALE_GENERATION, IOASID_NOT_FOUND, IOASID_FREE_PENDING
   */
  async replaceDomain(spec: ReplaceDomainSpec): Promise<Replaced & { readonly answeredFaultGroups: number }> {
    if (spec.withoutPasid && spec.generation !== 0) throw invalidField("generation", "a generation names an IOASID: not with without_pasid");
    const fail = this.#failNth.begin(FailNthOperation.REPLACE);
    this.hw.checkReplaceDomain(spec);
    // Replace is an attach of the new domain: a nested domain of a vIOMMU needs the device's vdevice.
    this.viommus.checkNestedAttach(spec.domainId, spec.deviceId);
    const replace = (generation: number) => {
      const old = this.hw.checkReplaceDomain(spec);
      this.viommus.checkNestedAttach(spec.domainId, spec.deviceId);
      if (old.domainId !== spec.domainId) fail.point("alloc-handle");
      const { result, changes } = this.hw.replaceDomain({ ...spec, generation });
      if (result.replaced === undefined) return { ...result, answeredFaultGroups: 0 };
      this.#recordChanges(changes);
      // Faults raised under the old attachment are answered INVALID: the domain they asked about
      // is no longer the device's (iommufd answers the old hwpt's outstanding faults on replace).
      const answeredFaultGroups = this.#dma.answered(this.prq.answerHandle(result.replaced.handleId, ResponseSource.REPLACE));
      this.#record(
        {
          $case: spec.withoutPasid ? "replaceGroupDomain" : "replaceDevicePasid",
          value: { ...this.#handleStep(result.handle), oldHandle: result.replaced.handleId, oldDomain: result.replaced.domainId, answeredFaultGroups },
        },
        this.#handleFields(result.handle),
      );
      return { ...result, answeredFaultGroups };
    };
    if (spec.withoutPasid) return replace(0);
    return this.#locks.run(pasidKey(spec.pasid), async () => {
      const old = this.hw.checkReplaceDomain(spec);
      if (spec.generation !== 0 && old.generation !== 0 && old.generation !== spec.generation) {
        throw iommuError("STALE_GENERATION", `PASID ${spec.pasid} was attached at generation ${old.generation}, not ${spec.generation}`);
      }
      const generation = old.generation !== 0 ? old.generation : spec.generation;
      if (generation !== 0 && old.domainId !== spec.domainId) {
        fail.point("core-describe");
        await this.#checkGeneration(spec.pasid, generation);
      }
      return replace(generation);
    });
  }

  /**
   * Removes an AttachDomain attachment (entry torn down, IOTLB/DevTLB flushed).
   * @returns fault groups of the handle answered INVALID
   */
  async detachDomain(spec: DetachDomainSpec & { readonly generation: number }): Promise<number> {
    if (spec.withoutPasid && spec.generation !== 0) throw invalidField("generation", "a generation names an IOASID: not with without_pasid");
    const fail = this.#failNth.begin(FailNthOperation.DETACH);
    this.hw.findDomainAttachment(spec);
    const detach = () => {
      const { result, changes } = this.hw.detachDomain(spec);
      this.#recordChanges(changes);
      this.#record(
        spec.withoutPasid ? { $case: "detachDevice", value: this.#handleStep(result) } : { $case: "detachDevicePasid", value: this.#handleStep(result) },
        this.#handleFields(result),
      );
      return this.#dma.answered(this.prq.answerHandle(result.handleId, ResponseSource.DETACH));
    };
    if (spec.generation === 0) return detach();
    return this.#locks.run(pasidKey(spec.pasid), async () => {
      const h = this.hw.findDomainAttachment(spec);
      if (h.generation !== 0) {
        if (h.generation !== spec.generation) {
          throw iommuError("STALE_GENERATION", `PASID ${spec.pasid} was attached at generation ${h.generation}, not ${spec.generation}`);
        }
      } else {
        fail.point("core-describe");
        await this.#checkGeneration(spec.pasid, spec.generation, { allowFreePending: true });
      }
      return detach();
    });
  }

  /**
   * Arms the failure injection: the next call of `operation` fails at its `nth` failure point.
   * @throws FAULT_INJECTION_DISABLED (the service was not started with failure injection)
   */
  injectFailure(operation: FailNthOperation, nth: number): void {
    if (this.#failNthControl === undefined) {
      throw iommuError("FAULT_INJECTION_DISABLED", "failure injection is off: start the IOMMU with IOASID_IOMMU_FAULT_INJECTION=1 (tests only)");
    }
    if (!Number.isInteger(nth) || nth < 1) throw invalidField("nth", "nth counts failure points from 1");
    this.#failNthControl.arm(operation, nth);
  }

  // ---- guest PASID binds ----

  /**
   * bind_gpasid (ioasid.rst guest life cycle steps 3–5): checks that `hpasid` is the caller's
   * (core Find: another set's is PERMISSION_DENIED, a FREE_PENDING one NOT_FOUND), then — on the
   * IOASID's first device bind only — takes the IOMMU's "bind" reference (step 4) and attaches the
   * SPID, which makes the core emit BIND (step 5); then programs the NESTED entry on the device.
   * Later devices bound to the same host PASID emit no second BIND and take no second reference
   * ("only the *first* BIND and *last* UNBIND emit notifications"); a rebind after the last unbind
   * attaches the SPID again (a new BIND) but reuses the reference that unbind kept.
   * @returns the handle, and whether this was the first bind
   */
  async bindGpasid(spec: BindGpasidSpec): Promise<{ handle: AttachHandle; firstBind: boolean }> {
    if (spec.setId === 0) throw invalidField("set_id", "set_id is required");
    if (spec.gpasid === 0 || spec.gpasid > MAX_SPID) throw invalidField("gpasid", `gpasid must be 1..${MAX_SPID}`);
    const entry = {
      deviceId: spec.deviceId,
      hpasid: spec.hpasid,
      parentDomainId: spec.parentDomainId,
      guestPgtable: spec.guestPgtable,
      owner: spec.owner,
      ownerData: spec.ownerData,
    };
    const fail = this.#failNth.begin(FailNthOperation.BIND);
    this.hw.checkGpasidEntry(entry, { ignoreTaken: true });
    return this.#locks.run(pasidKey(spec.hpasid), async () => {
      this.hw.checkGpasidEntry(entry, { ignoreTaken: true });
      // Ownership and state first (ioasid.rst: bind/unbind "performs permission checking based on
      // the IOASID set associated with the guest process"): another guest learns nothing more.
      fail.point("core-find");
      const info = await this.#core.find(spec.setId, spec.hpasid, spec.generation);
      this.hw.checkGpasidEntry(entry);
      let binding = this.hw.binding(spec.hpasid);
      if (binding === undefined || binding.generation !== info.generation) {
        fail.point("core-get-set");
        await this.#assertVmSet(spec.setId, spec.hpasid);
      }
      if (binding !== undefined && binding.generation !== info.generation) {
        // Left over from an earlier generation whose references were force-released: nothing of it
        // is held any more.
        this.#recordChanges(this.hw.teardownIoasid(spec.hpasid, binding.generation).changes);
        binding.refHeld = false;
        binding.spidAttached = false;
        this.hw.deleteBinding(spec.hpasid);
        binding = undefined;
      }
      const bound = binding?.gpasid ?? (info.spid !== 0 ? info.spid : undefined);
      if (bound !== undefined && bound !== spec.gpasid) {
        throw iommuError("SPID_MISMATCH", `host PASID ${spec.hpasid} is bound to guest PASID ${bound}, not ${spec.gpasid}`);
      }
      if (binding === undefined && info.spid === 0) await this.#assertSpidFree(spec.setId, spec.gpasid, spec.hpasid);
      const b = binding ?? this.hw.createBinding({ hpasid: spec.hpasid, setId: spec.setId, generation: info.generation, gpasid: spec.gpasid });
      if (b.refHeld && b.refUncertain === true) {
        // An earlier bind's get lost its answer: whether the core applied it decides whether this
        // bind takes a reference. Relying on it unasked let a bind run on a reference nobody held,
        // and the guest's free then reclaimed the PASID while it was programmed (chaos soak seed 4, S9).
        b.refHeld = await this.#holdsBindReference(b.hpasid, b.generation);
        b.refUncertain = false;
      }
      // A reference kept since the last unbind (it goes with the FREE) is not this call's to undo.
      const keptReference = b.refHeld;
      let firstBind = false;
      let refcount: number | undefined;
      try {
        if (!b.refHeld) {
          // Step 4: iommu_bind() -> ioasid_get().
          fail.point("core-get");
          try {
            refcount = (await this.#core.get(b.setId, b.hpasid, this.#holder, b.generation)).refcount;
          } catch (err) {
            // An answer lost on the way (UNAVAILABLE, DEADLINE_EXCEEDED) may hide a get the core
            // applied: count it held, so the undo below puts it back, or — if that put cannot be
            // made either — the IOASID's FREE releases it (a release of nothing is refused
            // harmlessly). Found by the chaos soak: a bind's get applied, its answer dropped, the
            // reference then held by nobody and the IOASID never reclaimed.
            if (isIndeterminate(err)) {
              b.refHeld = true;
              b.refUncertain = true;
            }
            throw err;
          }
          b.refHeld = true;
          b.refUncertain = false;
        }
        if (!b.spidAttached) {
          if (info.spid !== spec.gpasid) {
            // Step 5: the core emits BIND.
            fail.point("core-attach-spid");
            await this.#core.attachSpid(b.setId, b.hpasid, b.gpasid, b.generation);
            firstBind = true;
          }
          b.spidAttached = true;
        }
        fail.point("alloc-nested-domain");
        fail.point("alloc-handle");
        const { result: handle, changes } = this.hw.installGpasidEntry(entry);
        this.#record(
          { $case: "bindGpasid", value: { device: spec.deviceId, handle: handle.handleId, first: firstBind } },
          { ...this.#bindFields(b), ...(refcount === undefined ? {} : { refcount }) },
        );
        this.#recordChanges(changes);
        return { handle, firstBind };
      } catch (err) {
        // Undo what this call took, so a failed bind changes nothing.
        await this.#releaseIfUnused(b, { keepReference: keptReference }).catch((undo: unknown) =>
          this.#log?.warn({ err: undo, ioasid: b.hpasid }, "undoing a failed bind failed"),
        );
        throw err;
      }
    });
  }

  /**
   * unbind_gpasid for one device (steps 17–19): the entry is torn down and flushed; on the last
   * device the SPID is detached (the core emits UNBIND). The "bind" reference and the bind state
   * stay: the IOASID's FREE releases the reference (steps 22–23: ioasid_free() 1, then the IOMMU's
   * ioasid_put() 0), and a rebind before it attaches the SPID again (a new BIND) without taking a
   * second reference. An unbind that finds nothing — the FREE teardown came first (misbehaving
   * table step 30, "iommu_unbind()->ioasid_find() Fails") — changes nothing and answers
   * `unbound: false`; an unbind by another set is refused and changes nothing.
   */
  async unbindGpasid(spec: UnbindGpasidSpec): Promise<UnbindResult> {
    if (spec.setId === 0) throw invalidField("set_id", "set_id is required");
    if (spec.hpasid === RID_PASID) throw iommuError("PASID_ZERO_RESERVED", "PASID 0 is RID_PASID: it is never bound");
    this.hw.assertDevice(spec.deviceId);
    const fail = this.#failNth.begin(FailNthOperation.UNBIND);
    return this.#locks.run(pasidKey(spec.hpasid), async () => {
      this.hw.assertDevice(spec.deviceId);
      const b = this.hw.binding(spec.hpasid);
      if (b === undefined) {
        // Nothing bound here: refuse another set's call (PERMISSION_DENIED), else nothing to do.
        try {
          await this.#core.find(spec.setId, spec.hpasid, spec.generation);
        } catch (err) {
          if (!["IOASID_NOT_FOUND", "IOASID_FREE_PENDING", "SET_UNKNOWN"].some((r) => isDomainError(err, r))) throw err;
        }
        return { unbound: false, lastUnbind: false, answeredFaultGroups: 0 };
      }
      if (b.setId !== spec.setId) {
        throw iommuError("IOASID_NOT_IN_SET", `IOASID ${spec.hpasid} does not belong to set ${spec.setId}`);
      }
      if (spec.generation !== 0 && spec.generation !== b.generation) {
        throw iommuError("STALE_GENERATION", `IOASID ${spec.hpasid} is bound at generation ${b.generation}, not ${spec.generation}`);
      }
      if (spec.gpasid !== 0 && spec.gpasid !== b.gpasid) {
        throw iommuError("SPID_MISMATCH", `host PASID ${spec.hpasid} is bound to guest PASID ${b.gpasid}, not ${spec.gpasid}`);
      }
      const { result: handle, changes } = this.hw.removeGpasidEntry(spec.hpasid, spec.deviceId);
      if (handle === undefined) {
        // Not bound on this device; finish a detach an earlier failure left undone.
        if (b.devices.size === 0) await this.#releaseIfUnused(b, { keepReference: true });
        return { unbound: false, lastUnbind: false, answeredFaultGroups: 0 };
      }
      this.#recordChanges(changes);
      const answeredFaultGroups = this.#dma.answered(this.prq.answerHandle(handle.handleId, ResponseSource.DETACH));
      const last = b.devices.size === 0;
      const fields = this.#bindFields(b);
      // The last unbind detaches the SPID (UNBIND, step 19) but keeps the reference: the IOMMU
      // drops it when the FREE reaches it (the document's table, steps 22–23: ioasid_free() 1,
      // then the IOMMU's ioasid_put() 0). A failure from here on (the core unreachable, or the
      // injected one) leaves the entry torn down and the SPID attached: the next unbind of the
      // IOASID, or its FREE, finishes the detach.
      if (last) fail.point("core-detach-spid");
      const refcount = await this.#releaseIfUnused(b, { keepReference: true });
      this.#record(
        { $case: "unbindGpasid", value: { device: spec.deviceId, handle: handle.handleId, last } },
        { ...fields, ...(refcount === undefined ? {} : { refcount }) },
      );
      return { unbound: true, lastUnbind: last, answeredFaultGroups };
    });
  }

  // ---- IOASID events ----

  /**
   * The IOMMU's notifier handler (global scope, IOMMU priority). On FREE (misbehaving table steps
   * 22/25; DESIGN §5 "IOMMU"): tear down the IOASID's PASID entries on every device and flush
   * IOTLB/DevTLB, detach the SPID (the core emits nothing: the IOASID is FREE_PENDING, "IOMMU
   * driver will also avoid sending UNBIND if the PASID is already FREE"), and release the "bind"
   * reference with the acknowledgement. Idempotent: a redelivered FREE finds nothing and releases
   * nothing. Returns synchronously when the IOMMU has nothing for the IOASID (the common case).
   */
  handleEvent(event: IommuEvent): HandlerResult | undefined | Promise<HandlerResult | undefined> {
    if (event.type !== EventType.FREE) return undefined;
    const key = pasidKey(event.ioasid);
    if (this.#locks.isIdle(key) && !this.hw.hasIoasidState(event.ioasid, event.generation)) return undefined;
    return this.#locks.run(key, async () => {
      const r = await this.#onFree(event);
      // Torn down and drained in the kept tables before the acknowledgement releases the reference.
      await this.persist();
      return r;
    });
  }

  /** Whether the core's view of an IOASID lists this instance's "bind" reference. */
  #recordsBindReference(info: IoasidInfo): boolean {
    return info.holders.some((h) => h.holder.role === this.#holder.role && h.holder.instance === this.#holder.instance && h.holder.purpose === BIND_PURPOSE);
  }

  /** Whether the core records this instance's "bind" reference on the IOASID generation (transient errors throw). */
  async #holdsBindReference(ioasid: number, generation: number): Promise<boolean> {
    try {
      const info = await this.#core.describe(ioasid);
      return info?.generation === generation && this.#recordsBindReference(info);
    } catch (err) {
      if (isGone(err)) return false;
      throw err;
    }
  }

  async #onFree(event: IommuEvent): Promise<HandlerResult | undefined> {
    const seq = event.seq;
    const { result: torn, changes } = this.hw.teardownIoasid(event.ioasid, event.generation);
    this.#recordChanges(changes, seq);
    // Flush before release: the entries are gone (no new request), so draining now answers every
    // request of this IOASID generation, partial or pending, before the references are released:
    // none can reach the PASID's next owner.
    const drained = this.#dma.answered(
      this.prq.answerWhere((g) => !g.withoutPasid && g.pasid === event.ioasid && g.generation === event.generation, ResponseSource.IOASID_FREED),
      seq,
    );
    for (const mm of this.hw.mmsWithPasid(event.ioasid)) {
      if (mm.generation === event.generation) this.hw.deleteMm(mm.mmToken);
    }
    const b = this.hw.binding(event.ioasid);
    const release: string[] = [];
    let detachSpid = false;
    if (b !== undefined && b.generation === event.generation) {
      if (b.spidAttached) {
        // Detached by the core with the acknowledgement: one message, not a call per IOASID.
        detachSpid = true;
        b.spidAttached = false;
      }
      if (b.refHeld) {
        b.refHeld = false;
        release.push(BIND_PURPOSE);
      }
      this.hw.deleteBinding(b.hpasid);
    }
    this.#record(
      {
        $case: "iommuNbHandler",
        value: { type: EventType.FREE, tornDown: torn.length, drainedFaultGroups: drained, bindReferenceReleased: release.length > 0 },
      },
      { ioasid: event.ioasid, generation: event.generation, setId: event.setId, ...(event.spid === 0 ? {} : { spid: event.spid }), seq },
    );
    return release.length > 0 || detachSpid ? { release, detachSpid } : undefined;
  }

  // ---- native SVA ----

  /**
   * sva_bind_device: the mm's one PASID — allocated on its first bind in the mm's own set (token
   * type NONE, token = the mm token, quota 1) and shared by every device the mm binds (ioasid.rst
   * "Native IOASID Life Cycle" step 3) — is programmed on the device with the mm's SVA domain.
   * Binding the same (device, mm) again adds a user.
   */
  async svaBind(spec: SvaBindSpec): Promise<{ bond: SvaBond; pasidAllocated: boolean }> {
    if (spec.mmToken === 0n) throw invalidField("mm_token", "mm_token is required");
    this.hw.checkSvaBind(spec.deviceId, spec.mmToken, this.hw.mm(spec.mmToken)?.pasid, spec.owner, spec.ownerData);
    return this.#locks.run(mmKey(spec.mmToken), async () => {
      let mm = this.hw.mm(spec.mmToken);
      const dev = this.hw.assertDevice(spec.deviceId);
      this.hw.checkSvaBind(spec.deviceId, spec.mmToken, mm?.pasid, spec.owner, spec.ownerData);
      let allocated = false;
      if (mm === undefined) {
        const got = await this.#mmPasid(spec.mmToken, dev.maxPasids);
        mm = got.mm;
        allocated = got.allocated;
        this.hw.addMm(mm);
      }
      try {
        const { result: bond, changes } = this.hw.svaBind(spec.deviceId, spec.mmToken, spec.owner, spec.ownerData);
        this.#recordChanges(changes);
        this.#record(
          { $case: "svaBindDevice", value: { device: spec.deviceId, mmToken: spec.mmToken, users: bond.users } },
          { ioasid: mm.pasid, generation: mm.generation, setId: mm.setId },
        );
        return { bond, pasidAllocated: allocated };
      } catch (err) {
        if (allocated) {
          this.hw.deleteMm(spec.mmToken);
          await this.#core
            .freeSet(mm.setId)
            .catch((undo: unknown) => this.#log?.warn({ err: undo, mm: String(spec.mmToken) }, "undoing an mm PASID allocation failed"));
        }
        throw err;
      }
    });
  }

  /**
   * sva_unbind_device: drops one user of the bond; the last tears its entry down. The mm keeps its
   * PASID until {@link releaseMm}.
   * @returns users left
   */
  async svaUnbind(deviceId: string, mmToken: bigint): Promise<number> {
    if (mmToken === 0n) throw invalidField("mm_token", "mm_token is required");
    return this.#locks.run(mmKey(mmToken), () => {
      const mm = this.hw.mm(mmToken);
      const before = mm === undefined ? undefined : this.hw.handleAt(deviceId, mm.pasid);
      const { result: users, changes } = this.hw.svaUnbind(deviceId, mmToken);
      this.#recordChanges(changes);
      if (users === 0 && before !== undefined) this.#dma.answered(this.prq.answerHandle(before.handleId, ResponseSource.DETACH));
      this.#record(
        { $case: "svaUnbindDevice", value: { device: deviceId, mmToken, users } },
        { ioasid: mm?.pasid, generation: mm?.generation, setId: mm?.setId },
      );
      return users;
    });
  }

  /**
   * The mm went away (mmu_notifier release, then mmdrop: ioasid.rst native steps 9–11): bonds still
   * left are torn down and flushed, then the mm's PASID is freed through the core (its set with it).
   * An mm the IOMMU does not know changes nothing.
   */
  async releaseMm(mmToken: bigint): Promise<{ pasid: number; tornDownBonds: number }> {
    if (mmToken === 0n) throw invalidField("mm_token", "mm_token is required");
    return this.#locks.run(mmKey(mmToken), async () => {
      const mm = this.hw.mm(mmToken);
      if (mm === undefined) return { pasid: 0, tornDownBonds: 0 };
      const { result: torn, changes } = this.hw.releaseMmBonds(mmToken);
      this.#recordChanges(changes);
      try {
        await this.#core.freeSet(mm.setId);
      } catch (err) {
        if (!isDomainError(err, "SET_UNKNOWN")) throw err;
      }
      this.hw.deleteMm(mmToken);
      this.#record({ $case: "mmRelease", value: { mmToken, bonds: torn } }, { ioasid: mm.pasid, generation: mm.generation, setId: mm.setId });
      return { pasid: mm.pasid, tornDownBonds: torn };
    });
  }

  // ---- vIOMMU objects (iommufd model, DESIGN §5; viommu.ts holds the rules) ----

  /** Allocates a vIOMMU over a PAGING parent domain. @see ViommuTable.allocViommu */
  allocViommu(spec: { deviceId: string; parentDomainId: number; owner: string }): Viommu {
    return this.viommus.allocViommu(spec, this.#viommuHardware());
  }

  /** Destroys a vIOMMU nothing holds. @see ViommuTable.destroyViommu */
  destroyViommu(viommuId: number): void {
    this.viommus.destroyViommu(viommuId);
  }

  /** Gives a device its virt_id in a vIOMMU. @see ViommuTable.allocVdevice */
  allocVdevice(spec: { viommuId: number; deviceId: string; virtId: bigint }): Vdevice {
    return this.viommus.allocVdevice(spec, this.#viommuHardware());
  }

  /** Destroys a vdevice no nested attachment uses. @see ViommuTable.destroyVdevice */
  destroyVdevice(vdeviceId: number): void {
    this.viommus.destroyVdevice(vdeviceId, this.#viommuHardware());
  }

  /** Creates a vIOMMU's event queue. @see ViommuTable.allocVeventq */
  allocVeventq(spec: { viommuId: number; type: VeventqType; depth: number }): Veventq {
    return this.viommus.allocVeventq(spec);
  }

  /** Destroys an event queue. @see ViommuTable.destroyVeventq */
  destroyVeventq(veventqId: number): void {
    this.viommus.destroyVeventq(veventqId);
  }

  /** Takes items from an event queue. @see ViommuTable.readVeventq */
  readVeventq(veventqId: number, max: number): VeventqItem[] {
    return this.viommus.readVeventq(veventqId, max);
  }

  #viommuHardware(): ViommuHardwareView {
    return {
      assertDevice: (deviceId) => this.hw.assertDevice(deviceId),
      domain: (domainId) => this.hw.domain(domainId),
      attachments: () => this.hw.snapshot([], 0).handles,
    };
  }

  // ---- I/O page tables and DMA ----

  /** Maps a range of a PAGING domain. */
  map(domainId: number, m: Mapping): void {
    this.hw.map(domainId, m);
    this.#record({ $case: "iommuMap", value: { domain: domainId, iova: m.iova, size: m.size } });
  }

  /** Unmaps a range of a PAGING domain and flushes it. @returns bytes unmapped */
  unmap(domainId: number, iova: bigint, size: bigint): bigint {
    const { result, changes } = this.hw.unmap(domainId, iova, size);
    if (result > 0n) this.#record({ $case: "iommuUnmap", value: { domain: domainId, iova, size, unmapped: result } });
    this.#recordChanges(changes);
    return result;
  }

  /** Installs first-stage pages of a guest bind (the guest's page table). */
  async mapGuest(setId: number, hpasid: number, generation: number, m: Mapping): Promise<void> {
    await this.#locks.run(pasidKey(hpasid), () => {
      this.#guestBinding(setId, hpasid, generation);
      this.hw.mapGuest(hpasid, m);
      this.#record({ $case: "guestMap", value: { gva: m.iova, gpa: m.paddr, size: m.size } }, { ioasid: hpasid, setId });
    });
  }

  /** Removes first-stage pages of a guest bind and flushes them. @returns bytes unmapped */
  async unmapGuest(setId: number, hpasid: number, generation: number, iova: bigint, size: bigint): Promise<bigint> {
    return this.#locks.run(pasidKey(hpasid), () => {
      this.#guestBinding(setId, hpasid, generation);
      const { result, changes } = this.hw.unmapGuest(hpasid, iova, size);
      if (result > 0n) this.#record({ $case: "guestUnmap", value: { gva: iova, size, unmapped: result } }, { ioasid: hpasid, setId });
      this.#recordChanges(changes);
      return result;
    });
  }

  #guestBinding(setId: number, hpasid: number, generation: number): GpasidBinding {
    if (setId === 0) throw invalidField("set_id", "set_id is required");
    const b = this.hw.binding(hpasid);
    if (b === undefined || b.devices.size === 0) throw iommuError("GUEST_BIND_NOT_FOUND", `host PASID ${hpasid} is not bound on any device`);
    if (b.setId !== setId) throw iommuError("IOASID_NOT_IN_SET", `IOASID ${hpasid} does not belong to set ${setId}`);
    if (generation !== 0 && generation !== b.generation) {
      throw iommuError("STALE_GENERATION", `IOASID ${hpasid} is bound at generation ${b.generation}, not ${generation}`);
    }
    return b;
  }

  /**
   * A DMA request from a device: translated, a page request, or a fault.
   * @see DmaFaults.translate
   * @throws DEVICE_NOT_FOUND, INVALID_FIELD, PRGI_IN_USE
   */
  translate(t: TranslateSpec, hint?: PageRequestHint): DmaOutcome {
    return this.#dma.translate(t, hint);
  }

  /**
   * iommu_page_response from the group's owner.
   * @see DmaFaults.sendPageResponse
   * @throws INVALID_FIELD, FAULT_GROUP_NOT_FOUND, FAULT_GROUP_NOT_OWNED, FAULT_GROUP_ALREADY_RESPONDED, FAULT_GROUP_INCOMPLETE
   */
  sendPageResponse(owner: string, faultGroupId: bigint, code: PageResponseCode, noHandler = false): FaultGroup {
    return this.#dma.sendPageResponse(owner, faultGroupId, code, noHandler);
  }

  /**
   * AwaitPageResponse: waits until the device's group is answered, or `signal` aborts.
   * @see DmaFaults.awaitPageResponse
   * @throws DEVICE_NOT_FOUND, FAULT_GROUP_NOT_FOUND
   */
  awaitPageResponse(deviceId: string, faultGroupId: bigint, signal?: AbortSignal): Promise<FaultGroup> {
    return this.#dma.awaitPageResponse(deviceId, faultGroupId, signal);
  }

  /**
   * Opens an owner's fault stream; the owner's unanswered complete groups are sent first.
   * @see FaultHandlers.subscribe
   */
  subscribeFaults(owner: string, signal: AbortSignal, send: (item: FaultItem) => unknown): Promise<void> {
    return this.#dma.subscribeFaults(owner, signal, send);
  }

  /** Stops the fault timer and ends the fault streams (shutdown). */
  stop(): void {
    this.#dma.stop();
  }

  /** A consistent snapshot of the state. */
  snapshot(deviceIds: readonly string[], maxFlushes: number): IommuSnapshot {
    return this.hw.snapshot(deviceIds, maxFlushes);
  }

  // ---- internals ----

  /**
   * AttachDomain/DetachDomain with a generation: the PASID must be that generation of an allocated
   * IOASID, ACTIVE for an attach (nothing new may use a FREE_PENDING one).
   */
  async #checkGeneration(pasid: number, generation: number, options: { allowFreePending?: boolean } = {}): Promise<void> {
    const info = await this.#core.describe(pasid);
    if (info === undefined) {
      // A detach names the generation it attached: once reclaimed, that generation is stale.
      if (options.allowFreePending === true) throw iommuError("STALE_GENERATION", `IOASID ${pasid} generation ${generation} was reclaimed`);
      // What the core's Describe refuses an IOASID that is not allocated with.
      throw coreError("IOASID_NOT_FOUND", `IOASID ${pasid} is not allocated`);
    }
    if (info.generation !== generation) {
      throw iommuError("STALE_GENERATION", `IOASID ${pasid} is at generation ${info.generation}, not ${generation}`);
    }
    if (options.allowFreePending !== true && info.state === IoasidState.FREE_PENDING) {
      throw iommuError("IOASID_FREE_PENDING", `IOASID ${pasid} is being freed: nothing new can use it`);
    }
  }

  /** SPID_IN_USE when `gpasid` already maps to another IOASID of the set (checked before anything is taken). */
  async #assertSpidFree(setId: number, gpasid: number, hpasid: number): Promise<void> {
    let other: number;
    try {
      other = (await this.#core.findBySpid(setId, gpasid)).ioasid;
    } catch (err) {
      if (isDomainError(err, "SPID_NOT_FOUND")) return;
      if (isDomainError(err, "IOASID_FREE_PENDING")) other = -1;
      else throw err;
    }
    if (other !== hpasid) throw iommuError("SPID_IN_USE", `guest PASID ${gpasid} already maps to another IOASID of set ${setId}`);
  }

  /**
   * When no device is bound any more: detach the SPID (the core emits UNBIND, step 19) and — unless
   * `keepReference` (a guest's last unbind: the reference goes with the FREE) — put the "bind"
   * reference and forget the bind state. Each step is marked done as it succeeds, so a failure
   * leaves the rest for the next call on this IOASID.
   * @returns the refcount after the put, when one was made
   */
  async #releaseIfUnused(b: GpasidBinding, options: { keepReference?: boolean } = {}): Promise<number | undefined> {
    if (b.devices.size > 0) return undefined;
    if (b.spidAttached) {
      await this.#detachSpid(b);
      b.spidAttached = false;
    }
    if (options.keepReference === true && b.refHeld) return undefined;
    let refcount: number | undefined;
    if (b.refHeld) {
      try {
        refcount = (await this.#core.put(b.setId, b.hpasid, this.#holder, b.generation)).refcount;
      } catch (err) {
        if (!isGone(err) && !isDomainError(err, "NO_REFERENCE_HELD")) throw err;
      }
      b.refHeld = false;
    }
    this.hw.deleteBinding(b.hpasid);
    return refcount;
  }

  async #detachSpid(b: GpasidBinding): Promise<void> {
    try {
      await this.#core.detachSpid(b.setId, b.hpasid, b.generation);
    } catch (err) {
      if (!isGone(err) && !isDomainError(err, "SPID_NOT_ATTACHED")) throw err;
    }
  }

  /**
   * The mm's PASID: a new set (token NONE = the mm token, quota 1) and one IOASID below the device's
   * max_pasids; or, when the set already exists (an earlier life of this IOMMU), its IOASID.
   */
  /**
   * The ownership check of a guest bind: the host PASID's set must be a VM's (an MM token, the set
   * VFIO opened for the guest). A host process's native SVA set (a NONE token) or any other set is
   * refused — a guest's page tables never land on a host PASID (issue 16; the kernel's bind_gpasid
   * checks the IOASID's set against the guest's). Checked once per binding: later devices' binds of
   * the same host PASID and generation reuse it.
   * @throws PERMISSION_DENIED `SET_NOT_A_VM`
   */
  async #assertVmSet(setId: number, hpasid: number): Promise<void> {
    const set = await this.#core.getSet(setId);
    if (set.token.type !== TokenType.MM) {
      throw iommuError(
        "SET_NOT_A_VM",
        `host PASID ${hpasid} is in set ${setId}, which is not a VM's (token type ${set.token.type}): a guest bind needs the guest's MM set`,
      );
    }
  }

  async #mmPasid(mmToken: bigint, maxPasids: number): Promise<{ mm: MmContext; allocated: boolean }> {
    const token = { type: TokenType.NONE, value: mmToken };
    let setId: number;
    let created = false;
    try {
      setId = (await this.#core.createSet(token, 1)).id;
      created = true;
    } catch (err) {
      if (!isDomainError(err, "TOKEN_IN_USE")) throw err;
      setId = (await setByToken(this.#core, token)).id;
      const active = (await this.#core.listIoasids(setId)).find((i) => i.state === IoasidState.ACTIVE);
      if (active !== undefined) {
        if (active.ioasid >= maxPasids) {
          throw iommuError("PASID_OUT_OF_RANGE", `the mm's PASID ${active.ioasid} is not below the device's max_pasids ${maxPasids}`);
        }
        return { mm: { mmToken, setId, pasid: active.ioasid, generation: active.generation }, allocated: false };
      }
    }
    try {
      // No max = the core's own upper bound (its capacity may be below 2^20).
      const a = await this.#core.alloc(setId, maxPasids >= MAX_PASIDS ? { min: 1 } : { min: 1, max: maxPasids - 1 });
      return { mm: { mmToken, setId, pasid: a.ioasid, generation: a.generation }, allocated: true };
    } catch (err) {
      if (created) await this.#core.destroySet(setId).catch(() => undefined);
      throw err;
    }
  }

  #bindFields(b: GpasidBinding) {
    return { ioasid: b.hpasid, generation: b.generation, setId: b.setId, spid: b.gpasid };
  }

  #handleFields(h: AttachHandle): HistoryFields {
    return {
      ...(h.withoutPasid ? {} : { ioasid: h.pasid }),
      ...(h.generation === 0 ? {} : { generation: h.generation }),
    };
  }

  #handleStep(h: AttachHandle) {
    return { device: h.deviceId, handle: h.handleId, domain: h.domainId, owner: h.owner };
  }

  #record(action: IommuHistoryAction, fields: HistoryFields = {}): void {
    this.#history?.record(action, fields);
  }

  /** One history record per hardware change, in the kernel's words. */
  #recordChanges(changes: readonly HardwareChange[], seq?: number): void {
    // Two records per torn-down PASID (its entry, its flush): fields assigned, not spread.
    for (const c of changes) {
      const fields: HistoryFields = {};
      if (c.kind === "iotlbFlush") {
        const f = c.flush;
        if (f.pasid !== 0) fields.ioasid = f.pasid;
        if (seq !== undefined) fields.seq = seq;
        this.#record(
          {
            $case: "iotlbFlush",
            value: { scope: f.scope, cause: f.cause, domain: f.domainId, device: f.deviceId, devtlb: f.deviceTlb, address: f.address, size: f.size },
          },
          fields,
        );
        continue;
      }
      const e = c.entry;
      if (!e.withoutPasid) fields.ioasid = e.pasid;
      if (e.generation !== 0) fields.generation = e.generation;
      if (e.setId !== 0) fields.setId = e.setId;
      if (e.gpasid !== 0) fields.spid = e.gpasid;
      if (seq !== undefined) fields.seq = seq;
      const where = { device: c.deviceId, handle: e.handleId, domain: e.domainId, domainType: e.domainType };
      this.#record(
        c.kind === "teardownPasid" ? { $case: "teardownPasid", value: { ...where, cause: c.cause } } : { $case: "pasidEntrySet", value: where },
        fields,
      );
    }
  }
}

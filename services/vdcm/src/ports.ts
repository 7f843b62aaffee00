import type { HistoryActionInput, HistoryFields } from "@ioasid/bus";

/**
 * What VDCM needs from the outside world, as small interfaces: the IOASID core (references and
 * SPID translation), notifier registration, and the history. main.ts/server.ts give the real
 * implementations (gRPC clients, NATS); unit tests give in-memory ones. The IOMMU, through which
 * descriptors' DMA is translated, is {@link DmaTranslator} in descriptor-runner.ts.
 */

/** Who holds a reference: VDCM's are role "vdcm", its instance, and a purpose per work queue. */
export interface Holder {
  readonly role: string;
  readonly instance: string;
  readonly purpose: string;
}

/** A host IOASID and its generation. */
export interface Translation {
  readonly ioasid: number;
  readonly generation: number;
  /** References after the call. */
  readonly refcount: number;
}

/** One holder's references on one IOASID (for reconciliation after a restart). */
export interface HeldReference {
  readonly setId: number;
  readonly ioasid: number;
  readonly generation: number;
  readonly purpose: string;
  readonly count: number;
}

/**
 * The IOASID core calls VDCM makes. Failures are DomainErrors carrying the core's reasons
 * (SPID_NOT_FOUND, IOASID_FREE_PENDING, IOASID_NOT_IN_SET, STALE_GENERATION, SET_UNKNOWN…).
 */
export interface IoasidPort {
  /** ioasid_find_by_spid(): translates a guest PASID of the set, taking a reference for `holder`. */
  findBySpid(setId: number, spid: number, holder: Holder): Promise<Translation>;
  /** ioasid_find() without a reference: checks the IOASID belongs to the set and is live. */
  find(setId: number, ioasid: number, generation: number): Promise<{ readonly generation: number }>;
  /** ioasid_get(): takes a reference. */
  get(setId: number, ioasid: number, holder: Holder, generation: number): Promise<{ readonly refcount: number }>;
  /** ioasid_put(): drops a reference (at the generation it was taken, so never a later owner's). */
  put(setId: number, ioasid: number, holder: Holder, generation: number): Promise<{ readonly refcount: number; readonly reclaimed: boolean }>;
  /** The references a holder role/instance has on the IOASIDs of a set. */
  listHeld(setId: number, role: string, instance: string): Promise<HeldReference[]>;
}

/** VDCM's notifier registrations at the core (DEVICE priority, set scope, FREE events). */
export interface NotifierPort {
  /**
   * Registers (or finds, after a restart) VDCM's notifier on the set.
   * @returns the registration id
   * @throws DomainError FAILED_PRECONDITION `SET_NOT_EMPTY`, INVALID_ARGUMENT `SET_UNKNOWN`
   */
  register(setId: number): Promise<number>;
  /** Withdraws a registration; one that is already gone (its set was destroyed) is not an error. */
  unregister(registrationId: number): Promise<void>;
  /** VDCM's own registrations (this instance): id and set. */
  listOwn(): Promise<Array<{ readonly registrationId: number; readonly setId: number }>>;
}

/** Fields of one history record (the bus's). */
export type { HistoryFields };

/** Where VDCM records each change of its "hardware" (`vdevWrite`, `vdevClear`, `submit`). */
export interface HistorySink {
  record(action: HistoryActionInput, fields: HistoryFields): void;
}

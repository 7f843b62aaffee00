import type { RoleStatePort } from "@ioasid/bus";
import type { CorePort } from "@ioasid/role-kit";
import type { DmaTranslator } from "./descriptor-runner.js";
import type { HistorySink } from "./ports.js";
import type { VdcmKeptEntry } from "./vdcm-kept-entry.js";
import type { VdcmState } from "./vdcm-state.js";
import type { DevicePasidEntry } from "./vdcm-views.js";

// The options of the Vdcm class (src/vdcm.ts) and the shapes of the calls it answers.

/** The IOASID event VDCM handles (the fields of events.IoasidEvent it uses). */
export interface IoasidEventLike {
  /** "FREE" is the only type VDCM registers for; others are acknowledged and ignored. */
  readonly type: string;
  readonly seq: number;
  readonly ioasid: number;
  readonly generation: number;
  readonly setId: number;
  readonly spid: number;
}

/** What a ClearWqPasid did. */
export interface ClearResult {
  /** False when nothing was programmed (cleared twice, or by the FREE teardown first). */
  readonly cleared: boolean;
  readonly entry: DevicePasidEntry | undefined;
}

/** Options of {@link Vdcm}. */
export interface VdcmOptions {
  /** VDCM_INSTANCE: the subscriber instance and the holder instance of its references. */
  readonly instance: string;
  /** The IOASID core: references, SPID translation, VDCM's notifier registrations. */
  readonly core: CorePort;
  readonly dma: DmaTranslator;
  /** @default nothing recorded */
  readonly history?: HistorySink;
  /** @default a new, empty VdcmState */
  readonly state?: VdcmState;
  /** @default () => new Date() */
  readonly now?: () => Date;
  /** Where failures that are not returned (a reference that could not be released) are reported. */
  readonly log?: (level: "info" | "warn" | "error", msg: string, fields?: Record<string, unknown>) => void;
  /** Attempts of a put that fails for want of the core (UNAVAILABLE, DEADLINE_EXCEEDED). @default 3 */
  readonly putAttempts?: number;
  /**
   * Where the "hardware" tables are kept so they survive a crash (a RoleState in JetStream);
   * written before a call returns or an event is acknowledged. @default not kept
   */
  readonly store?: RoleStatePort<VdcmKeptEntry>;
}

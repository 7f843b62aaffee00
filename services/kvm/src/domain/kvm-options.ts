import type { RoleStatePort } from "@ioasid/bus";
import type { CorePort } from "@ioasid/role-kit";
import type { NotifierPort } from "./kvm-event.js";
import type { HistorySink } from "./kvm-history.js";
import type { KvmKeptEntry } from "./kvm-kept-entry.js";

/** Times a reference KVM could not drop (ioasid-core unreachable) is tried again before it is reported leaked. @default */
export const DEFAULT_MAX_RELEASE_ATTEMPTS = 300;

/** Log levels the domain uses. */
export type KvmLogLevel = "debug" | "info" | "warn" | "error";

/** Options of {@link Kvm}. */
export interface KvmOptions {
  readonly core: CorePort;
  readonly notifier: NotifierPort;
  /** The history sink of a VM instance. */
  readonly history: (instance: string) => HistorySink;
  readonly log?: (level: KvmLogLevel, msg: string, fields?: Record<string, unknown>) => void;
  /** @default () => new Date() */
  readonly now?: () => Date;
  /**
   * At start, drop the references and registrations a previous KVM process left behind for VMs the
   * store does not bring back (they died with it: ioasid.rst rule 4, "When KVM terminates before
   * FREE & UNBIND, references will be dropped for all host PASIDs"). @default true
   */
  readonly reapStale?: boolean;
  /** @default {@link DEFAULT_MAX_RELEASE_ATTEMPTS} */
  readonly maxReleaseAttempts?: number;
  /**
   * Where the VMs and their VMCS tables are kept so they survive a crash of KVM (a RoleState in
   * JetStream); written before a call returns or an event is acknowledged. @default not kept
   */
  readonly store?: RoleStatePort<KvmKeptEntry>;
  /** What {@link KvmOptions.store} held at start: the VMs come back with their tables. */
  readonly saved?: ReadonlyMap<string, KvmKeptEntry>;
}

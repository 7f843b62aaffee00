import { EventType } from "@ioasid/ioasid";

/** The IOASID event types KVM handles (ioasid.rst: "1. BIND/UNBIND 2. FREE"); anything else is OTHER. */
export const KvmEventType = { BIND: "BIND", UNBIND: "UNBIND", FREE: "FREE", OTHER: "OTHER" } as const;
export type KvmEventType = (typeof KvmEventType)[keyof typeof KvmEventType];

/** An IOASID event as KVM sees it (the fields of events.IoasidEvent it uses). */
export interface KvmEvent {
  /** Core sequence number. */
  readonly seq: bigint;
  readonly type: KvmEventType;
  /** The host PASID. */
  readonly ioasid: number;
  /** Its generation. */
  readonly generation: number;
  /** The guest PASID (SPID): bound (BIND), detached (UNBIND), attached when freed (FREE; 0: none). */
  readonly spid: number;
  readonly setId: number;
}
/** The events KVM registers for (ioasid.rst "KVM PASID Translation Table Updates": BIND/UNBIND, FREE). */
export const KVM_EVENT_TYPES: readonly EventType[] = [EventType.BIND, EventType.UNBIND, EventType.FREE];

/** A running event subscription of one VM. */
export interface EventSubscription {
  /** Stops receiving (deliveries in flight may still finish). */
  stop(): Promise<void>;
}

/** Handles one delivered event; the result lists the purposes of references released with the ack. */
export type KvmEventHandler = (event: KvmEvent, attempt: number) => Promise<{ readonly release?: readonly string[] }>;

/** Starts the event subscription of a VM instance (the bus SDK in production). */
export interface NotifierPort {
  subscribe(instance: string, handler: KvmEventHandler): Promise<EventSubscription>;
}

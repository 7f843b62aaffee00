import { createHash } from "node:crypto";
import { EventType, type Priority, type SpaceState } from "@ioasid/ioasid";
import type { DeliveryTarget } from "@ioasid/bus";
import { oplog, type events } from "@ioasid/proto";
import { scopeFromWire, scopeToWire } from "@ioasid/role-kit";
import { fromEventType, fromPriority, fromTokenType, toEventType, toPriority, toSetToken } from "./convert.js";
import { OpLogFormatError } from "./op-codec.js";

// The one place where a snapshot's wire format (ioasid.oplog.v1.Snapshot, SnapshotChunk and
// SnapshotMarker in proto/ioasid/oplog/v1/oplog.proto) meets the core's state.

/** Where one delivery to one target stands (the core's outcome codes). */
export const DeliveryOutcome = { PENDING: 0, ACKED: 1, MISSED: 2, DROPPED: 3 } as const;
export type DeliveryOutcome = (typeof DeliveryOutcome)[keyof typeof DeliveryOutcome];

/** One committed event whose delivery is not finished, as a snapshot holds it. */
export interface SnapshotDelivery {
  readonly event: events.IoasidEvent;
  readonly targets: readonly DeliveryTarget[];
  /** One {@link DeliveryOutcome} per target. */
  readonly outcomes: Uint8Array;
}

/** The core's whole state at one op-log position: the model, the allocator in force, the deliveries. */
export interface CoreSnapshot {
  readonly space: SpaceState;
  /** Where the custom allocator in force listens (with `space.allocator`). */
  readonly allocatorAddress: string | undefined;
  readonly deliveries: readonly SnapshotDelivery[];
}

const EVENT_TYPES = new Set<string>(Object.values(EventType));

const OUTCOME_TO_WIRE = [
  oplog.DeliveryOutcome.DELIVERY_OUTCOME_PENDING,
  oplog.DeliveryOutcome.DELIVERY_OUTCOME_ACKED,
  oplog.DeliveryOutcome.DELIVERY_OUTCOME_MISSED,
  oplog.DeliveryOutcome.DELIVERY_OUTCOME_DROPPED,
] as const;

/** A snapshot as one encoded `Snapshot` (split into chunks by the op log). */
export function encodeSnapshot(s: CoreSnapshot): Uint8Array {
  const st = s.space;
  const c = st.ioasids;
  const message: oplog.Snapshot = {
    capacity: st.capacity,
    lastEventSeq: BigInt(st.lastSeq),
    nextSetId: st.nextSetId,
    nextRegistrationId: st.nextRegistrationId,
    sets: st.sets.map((x) => ({ setId: x.id, tokenType: fromTokenType(x.token.type), token: x.token.value, quota: x.quota, freeing: x.freeing })),
    ioasids: {
      // Typed arrays iterate as ts-proto's packed encoders expect: no copy into number[].
      ioasidDeltas: deltas(c.ids),
      setIds: c.setIds as unknown as number[],
      generations: c.generations as unknown as number[],
      refcounts: c.refcounts as unknown as number[],
      spids: c.spids as unknown as number[],
      freePending: Array.from(c.freePending, (x) => x === 1),
    },
    holders: st.holders.map((h) => ({ ioasid: h.ioasid, holders: h.holders.map((x) => ({ holder: { ...x.holder }, count: x.count })) })),
    privateData: st.privateData.map((p) => ({ ioasid: p.ioasid, data: Buffer.from(p.data.buffer, p.data.byteOffset, p.data.byteLength) })),
    freeIoasidDeltas: deltas(st.freeGenerations.ids),
    freeGenerations: st.freeGenerations.generations as unknown as number[],
    registrations: st.registrations.map((r) => ({
      registrationId: r.id,
      subscriber: { ...r.subscriber },
      priority: fromPriority(r.priority),
      scope: scopeToWire(r.scope),
      events: r.events.map(fromEventType),
      attachedSetId: r.setId,
    })),
    allocator: st.allocator === undefined ? undefined : { name: st.allocator, address: s.allocatorAddress ?? "" },
    deliveries: s.deliveries.map((d) => ({
      event: d.event,
      targets: d.targets.map((t, i) => ({
        registrationId: t.registrationId,
        subscriber: { name: t.subscriber.name, instance: t.subscriber.instance },
        priority: fromPriority(t.priority as Priority),
        outcome: OUTCOME_TO_WIRE[d.outcomes[i]!]!,
      })),
    })),
  };
  return oplog.Snapshot.encode(message).finish();
}

/**
 * Reads a snapshot back.
 * @throws OpLogFormatError when it does not decode, carries fields this core does not know, or is
 *   incomplete (the model checks consistency when it restores it)
 */
export function decodeSnapshot(bytes: Uint8Array, at: OpLogFormatError["at"]): CoreSnapshot {
  const where = `the snapshot named by message ${at.seq} of the operation log (JetStream stream ${at.stream})`;
  let m: oplog.Snapshot;
  try {
    m = oplog.Snapshot.decode(bytes);
  } catch (err) {
    throw refused(where, `it does not decode: ${(err as Error).message}`, at);
  }
  if (oplog.Snapshot.encode(m).finish().length !== bytes.length) {
    throw refused(where, "it carries fields this core does not know: written by a newer ioasid-core?", at);
  }
  try {
    const c = m.ioasids ?? { ioasidDeltas: [], setIds: [], generations: [], refcounts: [], spids: [], freePending: [] };
    const n = c.ioasidDeltas.length;
    if ([c.setIds, c.generations, c.refcounts, c.spids, c.freePending].some((col) => col.length !== n)) throw new Error("its IOASID columns differ in length");
    if (m.freeIoasidDeltas.length !== m.freeGenerations.length) throw new Error("its free generations differ in length");
    const space: SpaceState = {
      capacity: m.capacity,
      lastSeq: Number(m.lastEventSeq),
      nextSetId: m.nextSetId,
      nextRegistrationId: m.nextRegistrationId,
      sets: m.sets.map((x) => ({ id: x.setId, token: toSetToken(x.tokenType, x.token), quota: x.quota, freeing: x.freeing })),
      ioasids: {
        ids: undeltas(c.ioasidDeltas),
        setIds: Uint32Array.from(c.setIds),
        generations: Uint32Array.from(c.generations),
        refcounts: Uint32Array.from(c.refcounts),
        spids: Uint32Array.from(c.spids),
        freePending: Uint8Array.from(c.freePending, (x) => (x ? 1 : 0)),
      },
      holders: m.holders.map((h) => ({
        ioasid: h.ioasid,
        holders: h.holders.map((x) => {
          if (x.holder === undefined) throw new Error(`a reference on IOASID ${h.ioasid} has no holder`);
          return { holder: { role: x.holder.role, instance: x.holder.instance, purpose: x.holder.purpose }, count: x.count };
        }),
      })),
      privateData: m.privateData.map((p) => ({ ioasid: p.ioasid, data: p.data })),
      freeGenerations: { ids: undeltas(m.freeIoasidDeltas), generations: Uint32Array.from(m.freeGenerations) },
      registrations: m.registrations.map((r) => {
        const scope = scopeFromWire(r.scope);
        if (scope === undefined || r.subscriber === undefined) throw new Error(`registration ${r.registrationId} has no scope or subscriber`);
        return {
          id: r.registrationId,
          subscriber: { name: r.subscriber.name, instance: r.subscriber.instance },
          priority: toPriority(r.priority),
          scope,
          events: r.events.map(toEventType),
          active: scope.kind === "global" || r.attachedSetId !== 0,
          setId: r.attachedSetId,
        };
      }),
      allocator: m.allocator?.name,
    };
    const deliveries = m.deliveries.map((d): SnapshotDelivery => {
      if (d.event === undefined) throw new Error("a delivery has no event");
      const event = d.event;
      if (!EVENT_TYPES.has(toEventType(event.type))) throw new Error(`delivery ${event.seq} has event type ${event.type}`);
      const outcomes = new Uint8Array(d.targets.length);
      const targets = d.targets.map((t, i): DeliveryTarget => {
        const o = OUTCOME_TO_WIRE.indexOf(t.outcome as (typeof OUTCOME_TO_WIRE)[number]);
        if (o < 0 || t.subscriber === undefined) throw new Error(`delivery ${event.seq} has a target without outcome or subscriber`);
        outcomes[i] = o;
        return { registrationId: t.registrationId, subscriber: { name: t.subscriber.name, instance: t.subscriber.instance }, priority: toPriority(t.priority) };
      });
      return { event, targets, outcomes };
    });
    return { space, allocatorAddress: m.allocator?.address, deliveries };
  } catch (err) {
    throw refused(where, (err as Error).message, at);
  }
}

/** The payload of one chunk. */
export function encodeChunk(index: number, data: Uint8Array): Uint8Array {
  return oplog.SnapshotChunk.encode({ index, data: Buffer.from(data.buffer, data.byteOffset, data.byteLength) }).finish();
}

/** Reads one chunk. @throws OpLogFormatError when it does not decode or is not chunk `index` */
export function decodeChunk(bytes: Uint8Array, index: number, at: OpLogFormatError["at"]): Uint8Array {
  const where = `snapshot chunk ${at.seq} (JetStream stream ${at.stream})`;
  let m: oplog.SnapshotChunk;
  try {
    m = oplog.SnapshotChunk.decode(bytes);
  } catch (err) {
    throw refused(where, `it does not decode: ${(err as Error).message}`, at);
  }
  if (m.index !== index) throw refused(where, `it is chunk ${m.index} where the marker names chunk ${index}`, at);
  return m.data;
}

/** SHA-256 of an encoded snapshot (the marker carries it; a reader checks it). */
export function snapshotDigest(bytes: Uint8Array): Buffer {
  return createHash("sha256").update(bytes).digest();
}

/**
 * A marker's payload: `marker` without its tail, then each tail operation (encoded by
 * `encodeOperation`) appended as field 7 — what `SnapshotMarker.encode` writes for `tail`, so the
 * log can size a marker before it writes it.
 */
export function encodeMarker(marker: Omit<oplog.SnapshotMarker, "tail">, tail: readonly Uint8Array[]): Uint8Array {
  const writer = oplog.SnapshotMarker.encode({ ...marker, tail: [] });
  for (const bytes of tail) writer.uint32((7 << 3) | 2).bytes(bytes);
  return writer.finish();
}

/** Bytes a marker takes besides its tail (chunk sequences included, at most 100 chunks). */
export const MARKER_OVERHEAD_BYTES = 2048;

function refused(where: string, problem: string, at: OpLogFormatError["at"]): OpLogFormatError {
  return new OpLogFormatError(
    `${where} is not a valid snapshot (${problem}): the core refuses it rather than misread its state. Start from an empty store ` +
      `(\`ioasidctl down --purge\` then \`ioasidctl up\`, or \`docker compose down -v\`), or run the ioasid-core that wrote it.`,
    at,
  );
}

function deltas(ids: Uint32Array): number[] {
  const out = new Array<number>(ids.length);
  let prev = 0;
  for (let i = 0; i < ids.length; i++) {
    out[i] = ids[i]! - prev;
    prev = ids[i]!;
  }
  return out;
}

function undeltas(d: readonly number[]): Uint32Array {
  const out = new Uint32Array(d.length);
  let prev = 0;
  for (let i = 0; i < d.length; i++) out[i] = prev += d[i]!;
  return out;
}

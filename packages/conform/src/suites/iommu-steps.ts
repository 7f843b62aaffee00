import type { Code } from "@ioasid/errors";
import type { PromiseClient } from "@ioasid/grpc-kit";
import { core, events, iommu, type bus } from "@ioasid/proto";
import { ClauseFailure, eventually, expectEqual, expectRefused, show } from "../clause.js";
import type { Harness, Tap } from "../harness.js";
import { alloc, createMmSet, deliveryOf, free, holdersOf, stateOf } from "./core-steps.js";

/**
 * The IOMMU suite's steps (suites/iommu.ts): the kit playing VFIO (a VM's set, its devices with a
 * stage 2, guest binds), a device (DMA, page requests), a fault handler (SubscribeFaultGroups) and
 * the core (FREE and its acknowledgement), and what it reads back from the target and the core.
 */
export type IommuClient = PromiseClient<typeof iommu.IommuServiceService>;

/** What the IOMMU clauses run with. */
export interface IommuCtx {
  readonly h: Harness;
  readonly iommu: IommuClient;
}

const { EventType } = events;
const { DomainType, TranslateOutcome, PageResponseCode } = iommu;

export const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);

/** Guest physical memory every kit VM's stage 2 maps: GPA [GPA, +STAGE2_SIZE) → HPA. */
export const GPA = 0x1000_0000n;
export const HPA = 0x8_0000_0000n;
export const STAGE2_SIZE = 0x10_0000n;
/** Guest virtual addresses the kit's devices touch. */
export const GVA = 0x7f00_0000_0000n;
export const PAGE = 0x1000n;
export const RW = { read: true, write: true };
/** An IOASID / domain id / fault group nobody has (far above what a run allocates). */
export const NO_ID = 0x7fff_fff0;
/** Where the kit attaches unchecked domains to raise faults: far above any IOASID a run allocates (lowest free first). */
export const FAULT_PASID = 0xf_ff00;
/** The kit's own reference, keeping an IOASID FREE_PENDING after the target released (it plays another role holding one). */
export const KIT_HOLDER = { role: "conform", instance: "kit", purpose: "hold" };

// ---- devices, domains, VMs ----

/** Registers a PF (PASID- and PRI-capable unless said otherwise) under a fresh id. */
export async function newDevice(c: IommuCtx, over: { maxPasids?: number; priCapable?: boolean } = {}): Promise<string> {
  const deviceId = c.h.uniqueName("dev");
  await c.iommu.registerDevice(
    P(iommu.RegisterDeviceRequest, {
      deviceId,
      maxPasids: over.maxPasids ?? 1 << 20,
      priCapable: over.priCapable ?? true,
      function: iommu.DeviceFunction.DEVICE_FUNCTION_PF,
      iommuGroup: 1,
    }),
  );
  return deviceId;
}

export async function newDomain(c: IommuCtx, type: iommu.DomainType, extra: object = {}): Promise<number> {
  return (await c.iommu.createDomain(P(iommu.CreateDomainRequest, { type, ...extra }))).domain!.domainId;
}

/** A guest as VFIO sets it up: its set (MM token), its devices with the VM's stage 2 attached without PASID and mapped. */
export interface Vm {
  readonly token: bigint;
  readonly setId: number;
  /** The fault-handler owner of the VM's handles (VFIO's, in a real stack). */
  readonly owner: string;
  readonly devices: string[];
  readonly stage2: number;
}

export async function newVm(c: IommuCtx, deviceCount = 1): Promise<Vm> {
  const token = c.h.uniqueToken();
  const setId = await createMmSet(c.h, token);
  const owner = c.h.uniqueName("vfio");
  const stage2 = await newDomain(c, DomainType.DOMAIN_TYPE_PAGING);
  await c.iommu.map(P(iommu.MapRequest, { domainId: stage2, iova: GPA, paddr: HPA, size: STAGE2_SIZE, access: RW }));
  const devices: string[] = [];
  for (let i = 0; i < deviceCount; i++) {
    const d = await newDevice(c);
    await c.iommu.attachDomain(P(iommu.AttachDomainRequest, { domainId: stage2, deviceId: d, withoutPasid: true, owner }));
    devices.push(d);
  }
  devices.sort();
  return { token, setId, owner, devices, stage2 };
}

export function bindRequest(v: Vm, a: { ioasid: number; generation: number }, deviceId: string, gpasid: number, extra: object = {}): iommu.BindGpasidRequest {
  return P(iommu.BindGpasidRequest, {
    setId: v.setId,
    hpasid: a.ioasid,
    generation: a.generation,
    gpasid,
    deviceId,
    guestPgtable: 0x5000n,
    owner: v.owner,
    ownerData: Buffer.from("conform"),
    ...extra,
  });
}

export function unbindRequest(
  v: Vm,
  a: { ioasid: number; generation: number },
  deviceId: string,
  gpasid: number,
  extra: object = {},
): iommu.UnbindGpasidRequest {
  return P(iommu.UnbindGpasidRequest, { setId: v.setId, hpasid: a.ioasid, generation: a.generation, gpasid, deviceId, ...extra });
}

/** An IOASID of the VM's set bound as `gpasid` on `devices` (every device of the VM by default). */
export async function boundPasid(c: IommuCtx, v: Vm, gpasid: number, devices: readonly string[] = v.devices): Promise<{ ioasid: number; generation: number }> {
  const a = await alloc(c.h, v.setId);
  for (const d of devices) await c.iommu.bindGpasid(bindRequest(v, a, d, gpasid));
  return a;
}

/** An IOASID FREE_PENDING: allocated, held by the kit, freed. Release with {@link putKitReference}. */
export async function freePending(c: IommuCtx, setId: number): Promise<{ ioasid: number; generation: number }> {
  const a = await alloc(c.h, setId);
  await takeKitReference(c, setId, a);
  await free(c.h, setId, a.ioasid, a.generation);
  return a;
}

export async function takeKitReference(c: IommuCtx, setId: number, a: { ioasid: number; generation: number }): Promise<void> {
  await c.h.core.get(P(core.GetRequest, { setId, ioasid: a.ioasid, generation: a.generation, holder: KIT_HOLDER }));
}

export async function putKitReference(c: IommuCtx, setId: number, a: { ioasid: number; generation: number }): Promise<void> {
  await c.h.core.put(P(core.PutRequest, { setId, ioasid: a.ioasid, generation: a.generation, holder: KIT_HOLDER }));
}

/**
 * An IOASID number that is not allocated now (allocated and reclaimed at once), with the generation
 * it had. Take it after the clause's other allocations: the next alloc may hand the number out again.
 */
export async function unallocated(c: IommuCtx, setId: number): Promise<{ ioasid: number; generation: number }> {
  const a = await alloc(c.h, setId);
  await free(c.h, setId, a.ioasid, a.generation);
  return a;
}

// ---- what the target shows ----

export async function query(c: IommuCtx, deviceIds: readonly string[], maxIotlbFlushes = 0): Promise<iommu.QueryStateResponse> {
  return c.iommu.queryState(P(iommu.QueryStateRequest, { deviceIds: [...deviceIds], maxIotlbFlushes }));
}

/** The devices among `deviceIds` whose PASID table has an entry at `pasid`, ascending. */
export async function entriesAt(c: IommuCtx, deviceIds: readonly string[], pasid: number): Promise<string[]> {
  return (await query(c, deviceIds)).devices.filter((d) => d.pasidEntries.some((e) => !e.withoutPasid && e.pasid === pasid)).map((d) => d.deviceId);
}

/** The devices among `deviceIds` with an IOTLB/DevTLB flush of `pasid` for `cause` in the flush log, ascending. */
export async function flushedAt(c: IommuCtx, deviceIds: readonly string[], pasid: number, cause: iommu.IotlbFlushCause): Promise<string[]> {
  const flushes = (await query(c, deviceIds, 1024)).iotlbFlushes;
  const out = flushes.filter((f) => f.pasid === pasid && f.cause === cause && f.deviceTlb && deviceIds.includes(f.deviceId)).map((f) => f.deviceId);
  return [...new Set(out)].sort();
}

/**
 * The target's tables for `deviceIds` as QueryState shows them (devices, handles, bonds,
 * outstanding fault groups, the domains those use and `domainIds`), without the snapshot time and
 * the flush log: what a refused call must not change. Scoped to the clause's own devices so that
 * another clause's leftovers cannot make it differ.
 */
export async function tables(c: IommuCtx, deviceIds: readonly string[], domainIds: readonly number[] = []): Promise<unknown> {
  const s = await query(c, deviceIds);
  const used = new Set([...domainIds, ...s.attachHandles.map((h) => h.domainId), ...s.svaBonds.map((b) => b.domainId)]);
  for (const d of s.domains) if (used.has(d.domainId) && d.parentDomainId !== 0) used.add(d.parentDomainId);
  return {
    devices: s.devices,
    handles: s.attachHandles,
    bonds: s.svaBonds,
    faultGroups: s.faultGroups,
    domains: s.domains.filter((d) => used.has(d.domainId)),
  };
}

/** The core's view of IOASIDs (state, SPID, holders): what a refused call must not change either. */
export async function coreView(c: IommuCtx, ioasids: readonly number[]): Promise<unknown> {
  return Promise.all(
    ioasids.map(async (ioasid) => ({ ioasid, state: await stateOf(c.h, ioasid), spid: await spidOf(c, ioasid), holders: await holdersOf(c.h, ioasid) })),
  );
}

export async function spidOf(c: IommuCtx, ioasid: number): Promise<number | undefined> {
  try {
    return (await c.h.core.describe({ ioasid })).info!.spid;
  } catch {
    return undefined;
  }
}

/** The subscriber instance the target registered as (subscriber "iommu", global scope). */
export async function iommuInstance(h: Harness): Promise<string> {
  const subs = await h.targetSubscribers("iommu");
  if (subs.length !== 1) throw new ClauseFailure('one registration of subscriber "iommu"', show(subs));
  return subs[0]!.instance;
}

export async function withTap<T>(c: IommuCtx, body: (tap: Tap) => Promise<T>): Promise<T> {
  const tap = c.h.tap("iommu", await iommuInstance(c.h));
  try {
    return await body(tap);
  } finally {
    tap.close();
  }
}

/** The sequence number of the newest committed event. */
export async function lastSeq(h: Harness): Promise<bigint> {
  return (await h.core.getStats({})).lastSeq;
}

/** The events the core committed for `ioasid` after `afterSeq`, as type names ("BIND", "UNBIND", "FREE"…). */
export async function eventsSince(h: Harness, afterSeq: bigint, ioasid: number): Promise<string[]> {
  const last = await lastSeq(h);
  const out: string[] = [];
  if (last <= afterSeq) return out;
  const ac = new AbortController();
  try {
    for await (const m of h.core.watchEvents({ fromSeq: afterSeq + 1n, types: [] }, { signal: ac.signal, deadlineMs: 10_000 })) {
      const e = m.event!;
      if (e.ioasid === ioasid) out.push(events.eventTypeToJSON(e.type).replace("EVENT_TYPE_", ""));
      if (e.seq >= last) break;
    }
  } finally {
    ac.abort();
  }
  return out;
}

/** Waits until `ioasid` at `generation` is reclaimed (the core no longer has that generation). */
export async function reclaimed(c: IommuCtx, a: { ioasid: number; generation: number }, what = "the IOASID reclaimed"): Promise<void> {
  await eventually(
    () => stateOf(c.h, a.ioasid),
    (s) => s === undefined || s.generation !== a.generation,
    what,
  );
}

/** The target's acknowledgement of the FREE of `ioasid` (its Ack in the batch), the delivery, and what `atAck` saw. */
export async function freeAndAck<T>(
  c: IommuCtx,
  setId: number,
  a: { ioasid: number; generation: number },
  atAck: () => Promise<T>,
): Promise<{ ack: bus.Ack; delivery: bus.Delivery; seenAtAck: T; headers: Record<string, string> }> {
  return withTap(c, async (tap) => {
    const acked = tap.ackOf(deliveryOf(EventType.EVENT_TYPE_FREE, a.ioasid), () => atAck());
    await free(c.h, setId, a.ioasid, a.generation);
    const { delivery, seenAtAck } = await acked;
    const d = delivery.batch.deliveries.find(deliveryOf(EventType.EVENT_TYPE_FREE, a.ioasid))!;
    const ack = delivery.ack!.acks.find((x) => x.seq === d.event!.seq && x.registrationId === d.registrationId);
    if (ack === undefined) throw new ClauseFailure(`an Ack of seq ${d.event!.seq} in the target's AckBatch`, show(delivery.ack));
    return { ack, delivery: d, seenAtAck, headers: delivery.headers };
  });
}

// ---- DMA and faults ----

export function dma(
  c: IommuCtx,
  deviceId: string,
  pasid: number,
  address: bigint,
  o: { write?: boolean; prgi?: number; last?: boolean; withoutPasid?: boolean } = {},
): Promise<iommu.TranslateResponse> {
  return c.iommu.translate(
    P(iommu.TranslateRequest, {
      deviceId,
      pasid,
      withoutPasid: o.withoutPasid === true,
      address,
      access: { read: o.write !== true, write: o.write === true },
      ...(o.prgi === undefined ? {} : { pageRequestGroup: { prgi: o.prgi, lastRequest: o.last ?? true } }),
    }),
  );
}

/** A PASID attach of an empty PAGING domain owned by `owner`: every access there misses, a page request for `owner`. */
export interface FaultTarget {
  readonly deviceId: string;
  readonly pasid: number;
  readonly domainId: number;
  readonly owner: string;
}

export async function faultTarget(c: IommuCtx, owner: string, deviceId?: string, pasid = FAULT_PASID): Promise<FaultTarget> {
  const dev = deviceId ?? (await newDevice(c));
  const domainId = await newDomain(c, DomainType.DOMAIN_TYPE_PAGING);
  await c.iommu.attachDomain(P(iommu.AttachDomainRequest, { domainId, deviceId: dev, pasid, owner, ownerData: Buffer.from(owner) }));
  return { deviceId: dev, pasid, domainId, owner };
}

/** An owner's SubscribeFaultGroups stream, collecting what arrives. */
export interface FaultStream {
  readonly items: Array<iommu.SubscribeFaultGroupsResponse["item"]>;
  groups(id?: bigint): iommu.FaultGroup[];
  answered(id?: bigint): iommu.FaultGroup[];
  /** Settles when the stream ends: with its error, or undefined. */
  readonly ended: Promise<unknown>;
  stop(): void;
}

export function openStream(c: IommuCtx, owner: string): FaultStream {
  const ac = new AbortController();
  const items: Array<iommu.SubscribeFaultGroupsResponse["item"]> = [];
  const ended = (async () => {
    try {
      for await (const m of c.iommu.subscribeFaultGroups({ owner }, { signal: ac.signal })) items.push(m.item);
      return undefined;
    } catch (err) {
      return err;
    }
  })();
  const pick = (k: "group" | "answered", id?: bigint) =>
    items.flatMap((i) => (i?.$case === k && (id === undefined || i.value.faultGroupId === id) ? [i.value] : []));
  return { items, groups: (id) => pick("group", id), answered: (id) => pick("answered", id), ended, stop: () => ac.abort() };
}

/**
 * Opens `owner`'s fault stream and waits until the target hands it groups: a probe page request at
 * `t` is raised until one is outstanding (handed to the stream) rather than answered at once (no
 * handler yet); the probe is then answered.
 */
export async function attachedStream(c: IommuCtx, t: FaultTarget): Promise<FaultStream> {
  const s = openStream(c, t.owner);
  let probe = 0n;
  await eventually(
    async () => {
      probe += PAGE;
      const r = await dma(c, t.deviceId, t.pasid, GVA + 0x4000_0000n + probe);
      const pending = (await query(c, [t.deviceId])).faultGroups.some((g) => g.faultGroupId === r.faultGroupId);
      if (pending)
        await c.iommu.sendPageResponse(
          P(iommu.SendPageResponseRequest, { owner: t.owner, faultGroupId: r.faultGroupId, code: PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS }),
        );
      return pending;
    },
    (ok) => ok,
    `the fault stream of ${t.owner} to receive groups (a probe page request handed to it, not answered NO_HANDLER)`,
  );
  return s;
}

/** The fault stream of a VM's owner, attached, proven with a probe at a bind's PASID (a first-stage miss is a page request). */
export async function attachedStreamAtBind(c: IommuCtx, v: Vm, a: { ioasid: number }, deviceId: string): Promise<FaultStream> {
  return attachedStream(c, { deviceId, pasid: a.ioasid, domainId: 0, owner: v.owner });
}

/** A complete fault group raised at `t` (a miss), handed to its owner's stream. */
export async function pendingGroup(c: IommuCtx, t: FaultTarget, s: FaultStream, address: bigint): Promise<bigint> {
  const r = await dma(c, t.deviceId, t.pasid, address);
  expectEqual(
    { outcome: r.outcome, complete: r.groupComplete },
    { outcome: TranslateOutcome.TRANSLATE_OUTCOME_PAGE_REQUEST, complete: true },
    "a miss on a PRI device",
  );
  await eventually(
    async () => s.groups(r.faultGroupId).length,
    (n) => n > 0,
    `group ${r.faultGroupId} on ${t.owner}'s fault stream`,
  );
  return r.faultGroupId;
}

/**
 * A call awaited later in the clause (AwaitPageResponse started before the answer): when the
 * clause fails first and never awaits it, its failure is not an unhandled rejection.
 */
export function settledLater<T>(call: Promise<T>): Promise<T> {
  call.catch(() => undefined);
  return call;
}

export function respond(c: IommuCtx, owner: string, faultGroupId: bigint, code: iommu.PageResponseCode): Promise<unknown> {
  return c.iommu.sendPageResponse(P(iommu.SendPageResponseRequest, { owner, faultGroupId, code }));
}

/** A stream that must end with `code`/`reason`. */
export async function expectStreamRefused(s: FaultStream, code: Code, reason: string, what: string): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const err = await Promise.race([s.ended, new Promise((r) => (timer = setTimeout(() => r("still open"), 10_000)))]).finally(() => clearTimeout(timer));
  if (err === "still open") throw new ClauseFailure(`the stream ended with ${reason}`, "it is still open after 10 s", what);
  await expectRefused(Promise.reject(err ?? new Error("the stream ended without an error")), code, reason, what);
}

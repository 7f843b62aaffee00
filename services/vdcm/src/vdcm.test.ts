import { MemoryRoleState, type HistoryActionCase, type HistoryActionInput, type RoleStatePort } from "@ioasid/bus";
import { describe, expect, it } from "vitest";
import { Code, DomainError } from "@ioasid/errors";
import { EventType, OWNER_ROLE, Priority, TokenType, type IoasidEvent } from "@ioasid/ioasid";
import { InProcessCore } from "@ioasid/testkit";
import { CompletionStatus, DescriptorOp, type DmaRequest, type DmaResult, type DmaTranslator } from "./domain/descriptor-runner.js";
import type { HistoryFields, Holder } from "./domain/ports.js";
import { PasidSpace, type Submission } from "./domain/submission.js";
import { Vdcm } from "./vdcm.js";
import type { VdcmKeptEntry } from "./domain/vdcm-kept-entry.js";
import { EntryState, WqMode } from "./domain/vdcm-model.js";
import { VdcmState } from "./domain/vdcm-state.js";
import { vdcmStateCodec } from "./adapters/vdcm-state-codec.js";

// The core is the real model (the testkit's InProcessCore); the IOMMU is an in-memory stand-in:
// the Vdcm orchestration is tested here without sockets; test/integration/vdcm.test.ts runs it
// against the core service.

const DEV = "0000:6a:01.0";
const M1 = "11111111-1111-4111-8111-111111111111";
const M2 = "22222222-2222-4222-8222-222222222222";
/** The two VMs' sets: the ids the core gives the first two sets it creates ({@link createSets}). */
const VM1 = 1;
const VM2 = 2;

/** The VMs' sets, as VFIO creates them (token type MM, a quota each). */
function createSets(core: InProcessCore): void {
  expect([70n, 80n].map((mm) => core.space.createSet({ token: { type: TokenType.MM, value: mm }, quota: 64 }).id)).toEqual([VM1, VM2]);
}

/** Allocates exactly `ioasid` in the set and attaches the guest PASID `spid` (as VFIO and the IOMMU would). @returns its generation */
function alloc(core: InProcessCore, setId: number, ioasid: number, spid = 0): number {
  const { generation } = core.space.alloc(setId, { min: ioasid, max: ioasid });
  if (spid !== 0) core.space.attachSpid(setId, ioasid, spid);
  return generation;
}

/** The guest frees the IOASID (VFIO's core Free): FREE_PENDING while referenced, else reclaimed. */
function freeIoasid(core: InProcessCore, ioasid: number): void {
  core.space.free(core.space.describe(ioasid)!.setId, ioasid);
}

/** The references on the IOASID by holder (`role/instance/purpose`; the allocation reference as "set-owner"). */
function holders(core: InProcessCore, ioasid: number): Record<string, number> {
  const info = core.space.describe(ioasid);
  return Object.fromEntries(
    (info?.holders ?? []).map((h) => [h.holder.role === OWNER_ROLE ? OWNER_ROLE : `${h.holder.role}/${h.holder.instance}/${h.holder.purpose}`, h.count]),
  );
}

const exists = (core: InProcessCore, ioasid: number): boolean => core.space.describe(ioasid) !== undefined;

/** The last FREE the core committed for the IOASID, as the bus delivers it to VDCM. */
function freeEvent(core: InProcessCore, ioasid: number): IoasidEvent {
  const e = core.events.findLast((x) => x.type === EventType.FREE && x.ioasid === ioasid);
  if (e === undefined) throw new Error(`the core committed no FREE of IOASID ${ioasid}`);
  return e;
}

/** The puts VDCM made, as `put <set> <ioasid> <purpose>`. */
const puts = (core: InProcessCore): string[] =>
  core.requests.filter((r) => r.call === "put").map(({ args: [setId, ioasid, holder] }) => `put ${String(setId)} ${String(ioasid)} ${(holder as Holder).purpose}`);

/** VDCM's registrations at the core: the sets they are on. */
const registeredSets = (core: InProcessCore): number[] =>
  core.space
    .listRegistrations()
    .filter((r) => r.subscriber.name === "vdcm")
    .map((r) => r.setId);

/** An IOMMU whose mapped pages translate; everything else is a fault. */
class FakeDma implements DmaTranslator {
  readonly mapped = new Set<string>();
  readonly requests: DmaRequest[] = [];
  gate: Promise<void> | undefined;
  async translate(r: DmaRequest): Promise<DmaResult> {
    this.requests.push(r);
    await this.gate;
    return this.mapped.has(`${r.pasid}:${r.address / 4096n}`) ? { outcome: "TRANSLATED" } : { outcome: "FAULT", reason: "NO_PASID_ENTRY" };
  }
}

function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

async function refused(p: Promise<unknown>, code: number, reason: string): Promise<void> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(DomainError);
  expect({ code: (err as DomainError).code, reason: (err as DomainError).reason }).toEqual({ code, reason });
}

/**
 * VDCM with DEV (dedicated wq 0, 1, 3; shared wq 2); M1 = [wq 0, shared wq 2, wq 3] assigned to
 * VM1, M2 = [wq 1, shared wq 2] assigned to VM2.
 */
async function setup(options: { store?: RoleStatePort<VdcmKeptEntry> } = {}) {
  const core = new InProcessCore();
  createSets(core);
  const dma = new FakeDma();
  const history: Array<{ action: HistoryActionCase; step: HistoryActionInput } & HistoryFields> = [];
  const vdcm = new Vdcm({ instance: "vdcm0", core, dma, history: { record: (step, f) => history.push({ action: step.$case, step, ...f }) }, ...options });
  await vdcm.registerDevice({
    deviceId: DEV,
    wqs: [
      { wqId: 0, mode: WqMode.DEDICATED },
      { wqId: 1, mode: WqMode.DEDICATED },
      { wqId: 2, mode: WqMode.SHARED },
      { wqId: 3, mode: WqMode.DEDICATED },
    ],
  });
  await vdcm.createMdev(DEV, M1, [0, 2, 3]);
  await vdcm.createMdev(DEV, M2, [1, 2]);
  await vdcm.assignMdev(M1, VM1);
  await vdcm.assignMdev(M2, VM2);
  return { core, dma, history, vdcm };
}

const noop = (over: Partial<Submission>): Submission => ({
  mdevUuid: M1,
  virtualWq: 1,
  pasid: 0,
  pasidSpace: undefined,
  generation: 0,
  descriptor: { op: DescriptorOp.NOOP, srcAddress: 0n, dstAddress: 0n, size: 0n },
  ...over,
});

describe("Vdcm mdev_write / mdev_clear (life-cycle steps 8–16)", () => {
  it("translates the guest PASID taking a reference, and programs the host PASID", async () => {
    const { core, vdcm, history } = await setup();
    alloc(core, VM1, 201, 101);
    const entry = await vdcm.writeWqPasid(M1, 0, 101);
    expect(entry).toMatchObject({ hpasid: 201, gpasid: 101, setId: VM1, wqId: 0, mdevUuid: M1, state: EntryState.PROGRAMMED });
    expect(holders(core, 201)).toEqual({ "set-owner": 1, [`vdcm/vdcm0/${DEV}.wq0`]: 1 });
    expect(vdcm.snapshot().devices[0]!.wqs[0]!.hpasid).toBe(201);
    expect(history).toEqual([expect.objectContaining({ action: "vdevWrite", ioasid: 201, spid: 101, setId: VM1, refcount: 2 })]);
  });

  it("refuses a guest PASID never bound, or being freed, and programs nothing", async () => {
    const { core, vdcm } = await setup();
    await refused(vdcm.writeWqPasid(M1, 0, 101), Code.NOT_FOUND, "SPID_NOT_FOUND");
    alloc(core, VM1, 201, 101);
    core.space.get(VM1, 201, { role: "iommu", instance: "i", purpose: "p" }, 0);
    freeIoasid(core, 201);
    await refused(vdcm.writeWqPasid(M1, 0, 101), Code.NOT_FOUND, "IOASID_FREE_PENDING");
    expect(vdcm.snapshot().devices[0]!.pasidEntries).toEqual([]);
    // The work queue was not left reserved.
    alloc(core, VM1, 202, 102);
    await vdcm.writeWqPasid(M1, 0, 102);
  });

  it("puts the reference back when the device refuses the PASID (PASID_IN_USE)", async () => {
    const { core, vdcm } = await setup();
    alloc(core, VM1, 201, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    // An operator force-released VDCM's reference, the IOASID was reclaimed and VM2 got it.
    core.space.put(VM1, 201, { role: "vdcm", instance: "vdcm0", purpose: `${DEV}.wq0` }, 0);
    freeIoasid(core, 201);
    alloc(core, VM2, 201, 555);
    await refused(vdcm.writeWqPasid(M2, 0, 555), Code.FAILED_PRECONDITION, "PASID_IN_USE");
    expect(holders(core, 201)).toEqual({ "set-owner": 1 });
    expect(vdcm.snapshot().devices[0]!.pasidEntries.map((e) => [e.setId, e.wqId])).toEqual([[VM1, 0]]);
  });

  it("keeps retrying, on its timer, the put of a cleared entry while the core is unreachable", async () => {
    const { core, vdcm } = await setup();
    alloc(core, VM1, 201, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    for (let i = 0; i < 5; i++) core.failNext("put"); // the clear's three attempts and the first retry fail (UNAVAILABLE)
    expect(await vdcm.clearWqPasid(M1, 0)).toMatchObject({ cleared: true });
    expect(holders(core, 201)).toEqual({ "set-owner": 1, [`vdcm/vdcm0/${DEV}.wq0`]: 1 });
    expect(vdcm.pendingPutCount).toBe(1);
    expect(await vdcm.retryPendingPuts()).toBe(1);
    expect(await vdcm.retryPendingPuts()).toBe(1);
    expect(await vdcm.retryPendingPuts()).toBe(0);
    expect(holders(core, 201)).toEqual({ "set-owner": 1 });
    // A FREE now reclaims at once: nothing of VDCM's is left.
    freeIoasid(core, 201);
    expect(exists(core, 201)).toBe(false);
  });

  it("releases, on its timer, a reference the core took for a write whose answer was lost, and keeps the ones entries back", async () => {
    const { core, vdcm } = await setup();
    alloc(core, VM1, 201, 101);
    alloc(core, VM1, 202, 102);
    await vdcm.writeWqPasid(M1, 2, 102); // a programmed entry (device wq 3): its reference stays
    core.loseAnswerOf("findBySpid"); // the core takes the reference, VDCM hears UNAVAILABLE
    await refused(vdcm.writeWqPasid(M1, 0, 101), Code.UNAVAILABLE, "UNAVAILABLE");
    expect(holders(core, 201)).toEqual({ "set-owner": 1, [`vdcm/vdcm0/${DEV}.wq0`]: 1 }); // held by nobody
    expect(vdcm.pendingPutCount).toBe(1);
    expect(await vdcm.retryPendingPuts()).toBe(0);
    expect(holders(core, 201)).toEqual({ "set-owner": 1 });
    expect(holders(core, 202)).toEqual({ "set-owner": 1, [`vdcm/vdcm0/${DEV}.wq3`]: 1 });
    // The guest's retry then programs it.
    await vdcm.writeWqPasid(M1, 0, 101);
    expect(holders(core, 201)).toEqual({ "set-owner": 1, [`vdcm/vdcm0/${DEV}.wq0`]: 1 });
  });

  it("clears by draining the work queue first, then clears the entry, then puts", async () => {
    const { core, vdcm, dma, history } = await setup();
    alloc(core, VM1, 201, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    dma.mapped.add("201:1");
    const gate = deferred();
    dma.gate = gate.promise;
    const running = vdcm.submitDescriptor(noop({ virtualWq: 0, descriptor: { op: DescriptorOp.FILL, srcAddress: 0n, dstAddress: 4096n, size: 64n } }));
    let clearedAt = 0;
    const clear = vdcm.clearWqPasid(M1, 0).then((r) => ((clearedAt = history.length), r));
    await Promise.resolve();
    // Draining: no new descriptor on the entry, and it is not cleared yet.
    await refused(vdcm.submitDescriptor(noop({ virtualWq: 0 })), Code.FAILED_PRECONDITION, "WQ_PASID_NOT_PROGRAMMED");
    expect(vdcm.snapshot().devices[0]!.pasidEntries[0]!.state).toBe(EntryState.DRAINING);
    gate.resolve();
    expect((await running).status).toBe(CompletionStatus.SUCCESS);
    expect(await clear).toMatchObject({ cleared: true, entry: { hpasid: 201, gpasid: 101 } });
    expect(history.map((h) => h.action)).toEqual(["vdevWrite", "submit", "vdevClear"]);
    expect(clearedAt).toBe(3);
    expect(core.calls.at(-1)).toBe("put");
    expect(puts(core).at(-1)).toBe(`put ${VM1} 201 ${DEV}.wq0`);
    expect(holders(core, 201)).toEqual({ "set-owner": 1 });
    expect(await vdcm.clearWqPasid(M1, 0)).toEqual({ cleared: false, entry: undefined });
  });
});

/** A FREE as the bus delivers it, for events the core did not commit (another generation, another set). */
const FREE = (ioasid: number, generation: number, setId: number, seq = 50) => ({ type: "FREE", seq, ioasid, generation, setId, spid: 101 });

describe("Vdcm FREE handler (misbehaving-guest table steps 21/24)", () => {
  it("drains and clears every entry using the PASID and releases their references with the ack; a redelivery releases nothing", async () => {
    const { core, vdcm, history } = await setup();
    const gen = alloc(core, VM1, 201, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    await vdcm.writeWqPasid(M1, 2, 101);
    freeIoasid(core, 201);
    const event = freeEvent(core, 201);
    expect(event).toMatchObject({ ioasid: 201, generation: gen, setId: VM1, spid: 101 });
    const ack = await vdcm.onIoasidEvent(event);
    expect(ack.release.sort()).toEqual([`${DEV}.wq0`, `${DEV}.wq3`]);
    expect(vdcm.snapshot().devices[0]!.pasidEntries).toEqual([]);
    expect(history.filter((h) => h.action === "vdevClear")).toEqual([
      expect.objectContaining({ ioasid: 201, seq: event.seq, setId: VM1 }),
      expect.objectContaining({ ioasid: 201, seq: event.seq, setId: VM1 }),
    ]);
    expect(await vdcm.onIoasidEvent(event)).toEqual({ release: [] });
    // The core releases them with the acknowledgement: the last one reclaims.
    for (const purpose of ack.release) core.space.put(VM1, 201, { role: "vdcm", instance: "vdcm0", purpose }, gen);
    expect(exists(core, 201)).toBe(false);
  });

  it("ignores other events and other generations", async () => {
    const { core, vdcm } = await setup();
    const gen = alloc(core, VM1, 201, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    expect(await vdcm.onIoasidEvent({ ...FREE(201, gen, VM1), type: "UNBIND" })).toEqual({ release: [] });
    expect(await vdcm.onIoasidEvent(FREE(201, gen + 1, VM1))).toEqual({ release: [] });
    expect(await vdcm.onIoasidEvent(FREE(201, gen, VM2))).toEqual({ release: [] });
    expect(vdcm.snapshot().devices[0]!.pasidEntries).toHaveLength(1);
  });

  it("waits for a write whose reference was taken before the free, then clears what it programmed", async () => {
    const { core, vdcm } = await setup();
    alloc(core, VM1, 201, 101);
    const reply = deferred();
    core.holdAnswerOf("findBySpid", reply.promise);
    const write = vdcm.writeWqPasid(M1, 0, 101);
    await new Promise((r) => setImmediate(r));
    expect(holders(core, 201)[`vdcm/vdcm0/${DEV}.wq0`]).toBe(1);
    freeIoasid(core, 201);
    let acked = false;
    const free = vdcm.onIoasidEvent(freeEvent(core, 201)).then((a) => ((acked = true), a));
    await new Promise((r) => setImmediate(r));
    expect(acked).toBe(false);
    reply.resolve();
    await write;
    expect(await free).toEqual({ release: [`${DEV}.wq0`] });
    expect(vdcm.snapshot().devices[0]!.pasidEntries).toEqual([]);
  });

  it("leaves a clear in progress its release: one put, never two", async () => {
    const { core, vdcm, dma } = await setup();
    alloc(core, VM1, 201, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    dma.mapped.add("201:0");
    const gate = deferred();
    dma.gate = gate.promise;
    const desc = vdcm.submitDescriptor(noop({ virtualWq: 0, descriptor: { op: DescriptorOp.FILL, srcAddress: 0n, dstAddress: 0n, size: 8n } }));
    const clear = vdcm.clearWqPasid(M1, 0);
    await Promise.resolve();
    freeIoasid(core, 201);
    const free = vdcm.onIoasidEvent(freeEvent(core, 201));
    gate.resolve();
    await desc;
    expect(await clear).toMatchObject({ cleared: true });
    expect(await free).toEqual({ release: [] });
    expect(puts(core)).toEqual([`put ${VM1} 201 ${DEV}.wq0`]);
    expect(exists(core, 201)).toBe(false);
  });

  it("drains descriptors in flight on shared work queues with the PASID before acknowledging", async () => {
    const { core, vdcm, dma } = await setup();
    alloc(core, VM1, 201, 101);
    dma.mapped.add("201:0");
    const gate = deferred();
    dma.gate = gate.promise;
    const desc = vdcm.submitDescriptor(
      noop({ virtualWq: 1, pasid: 101, pasidSpace: PasidSpace.GUEST, descriptor: { op: DescriptorOp.FILL, srcAddress: 0n, dstAddress: 0n, size: 8n } }),
    );
    await new Promise((r) => setImmediate(r));
    freeIoasid(core, 201);
    let acked = false;
    const free = vdcm.onIoasidEvent(freeEvent(core, 201)).then(() => (acked = true));
    await new Promise((r) => setImmediate(r));
    expect(acked).toBe(false);
    gate.resolve();
    await desc;
    await free;
    expect(exists(core, 201)).toBe(false);
  });
});

describe("Vdcm descriptor submission", () => {
  it("translates a shared work queue's guest PASID, holds a reference while it runs, then puts it", async () => {
    const { core, vdcm, dma, history } = await setup();
    const gen = alloc(core, VM1, 201, 101);
    dma.mapped.add("201:0").add("201:1");
    const gate = deferred();
    dma.gate = gate.promise;
    const run = vdcm.submitDescriptor(
      noop({ pasid: 101, pasidSpace: PasidSpace.GUEST, descriptor: { op: DescriptorOp.MEMMOVE, srcAddress: 0n, dstAddress: 4096n, size: 4096n } }),
    );
    await new Promise((r) => setImmediate(r));
    expect(holders(core, 201)[`vdcm/vdcm0/${DEV}.wq2.desc`]).toBe(1);
    gate.resolve();
    expect(await run).toEqual({ hpasid: 201, generation: gen, status: CompletionStatus.SUCCESS, bytesCompleted: 4096n, faultAddress: 0n, faultGroupId: 0n });
    expect(holders(core, 201)).toEqual({ "set-owner": 1 });
    expect(dma.requests.map((r) => [r.pasid, r.address, r.write])).toEqual([
      [201, 0n, false],
      [201, 4096n, true],
    ]);
    expect(history.at(-1)).toMatchObject({ action: "submit", ioasid: 201, spid: 101, setId: VM1 });
  });

  it("drops an untranslatable descriptor with the error: nothing reaches the device", async () => {
    const { core, vdcm, dma, history } = await setup();
    const g1 = alloc(core, VM1, 201, 101);
    alloc(core, VM2, 202, 101);
    await refused(vdcm.submitDescriptor(noop({ pasid: 999, pasidSpace: PasidSpace.GUEST })), Code.NOT_FOUND, "SPID_NOT_FOUND");
    // VM2 names VM1's host PASID on its own mdev: another set's IOASID.
    await refused(vdcm.submitDescriptor(noop({ mdevUuid: M2, pasid: 201, pasidSpace: PasidSpace.HOST })), Code.PERMISSION_DENIED, "IOASID_NOT_IN_SET");
    await refused(vdcm.submitDescriptor(noop({ pasid: 201, pasidSpace: PasidSpace.HOST, generation: g1 + 1 })), Code.FAILED_PRECONDITION, "STALE_GENERATION");
    await refused(vdcm.submitDescriptor(noop({ pasid: 555, pasidSpace: PasidSpace.HOST })), Code.NOT_FOUND, "IOASID_NOT_FOUND");
    core.space.get(VM1, 201, { role: "iommu", instance: "i", purpose: "p" }, 0);
    freeIoasid(core, 201);
    await refused(vdcm.submitDescriptor(noop({ pasid: 101, pasidSpace: PasidSpace.GUEST })), Code.NOT_FOUND, "IOASID_FREE_PENDING");
    expect(dma.requests).toEqual([]);
    expect(history.map((h) => h.action)).toEqual(["submit", "submit", "submit", "submit", "submit"]);
    expect(history.every((h) => h.ioasid === undefined && h.step.$case === "submit" && h.step.value.dropped === true)).toBe(true);
    expect(holders(core, 202)).toEqual({ "set-owner": 1 });
  });

  it("runs a host PASID (ENQCMD-translated) of the mdev's own set", async () => {
    const { core, vdcm } = await setup();
    const gen = alloc(core, VM2, 202, 101);
    expect(await vdcm.submitDescriptor(noop({ mdevUuid: M2, pasid: 202, pasidSpace: PasidSpace.HOST }))).toMatchObject({
      hpasid: 202,
      generation: gen,
      status: CompletionStatus.SUCCESS,
    });
    expect(holders(core, 202)).toEqual({ "set-owner": 1 });
  });

  it("reports DMA faults as completion status, with the bytes done before", async () => {
    const { core, vdcm, dma } = await setup();
    alloc(core, VM1, 201, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    dma.mapped.add("201:0");
    expect(await vdcm.submitDescriptor(noop({ virtualWq: 0, descriptor: { op: DescriptorOp.FILL, srcAddress: 0n, dstAddress: 4000n, size: 200n } }))).toMatchObject({
      status: CompletionStatus.DMA_FAULT,
      bytesCompleted: 96n,
      faultAddress: 4096n,
    });
  });

  it("refuses malformed submissions with INVALID_FIELD and the wrong work-queue state", async () => {
    const { core, vdcm, dma } = await setup();
    alloc(core, VM1, 201, 101);
    const calls = core.calls.length; // the registrations setup made
    await refused(vdcm.submitDescriptor(noop({ virtualWq: 0 })), Code.FAILED_PRECONDITION, "WQ_PASID_NOT_PROGRAMMED");
    await refused(vdcm.submitDescriptor(noop({ virtualWq: 0, pasid: 101 })), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(vdcm.submitDescriptor(noop({ pasid: 101 })), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(vdcm.submitDescriptor(noop({ pasidSpace: PasidSpace.GUEST })), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(vdcm.submitDescriptor(noop({ pasid: 1 << 20, pasidSpace: PasidSpace.GUEST })), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(vdcm.submitDescriptor(noop({ pasid: 101, pasidSpace: PasidSpace.GUEST, descriptor: undefined })), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(vdcm.submitDescriptor(noop({ virtualWq: 9 })), Code.NOT_FOUND, "WQ_NOT_FOUND");
    await refused(vdcm.submitDescriptor(noop({ mdevUuid: "33333333-3333-4333-8333-333333333333" })), Code.NOT_FOUND, "MDEV_NOT_FOUND");
    expect(dma.requests).toEqual([]);
    expect(core.calls.slice(calls)).toEqual([]);
  });
});

describe("Vdcm isolation between VMs", () => {
  it("translates a guest PASID in the writing mdev's own set; another VM's clear leaves the first VM's entry alone", async () => {
    const { core, vdcm } = await setup();
    alloc(core, VM1, 201, 101);
    alloc(core, VM2, 202, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    expect(await vdcm.clearWqPasid(M2, 0)).toEqual({ cleared: false, entry: undefined });
    expect((await vdcm.writeWqPasid(M2, 0, 101)).hpasid).toBe(202);
    expect(vdcm.snapshot().devices[0]!.pasidEntries.map((e) => [e.hpasid, e.setId, e.mdevUuid])).toEqual([
      [201, VM1, M1],
      [202, VM2, M2],
    ]);
    expect(holders(core, 201)).toEqual({ "set-owner": 1, [`vdcm/vdcm0/${DEV}.wq0`]: 1 });
  });
});

describe("Vdcm assignment and registration", () => {
  it("registers on a set with its first mdev and withdraws with its last", async () => {
    const { core, vdcm } = await setup();
    expect(registeredSets(core).sort()).toEqual([VM1, VM2]);
    const m3 = (await vdcm.createMdev(DEV, "", [2])).mdevUuid;
    expect((await vdcm.assignMdev(m3, VM1)).registered).toBe(false);
    expect(await vdcm.unassignMdev(M1)).toEqual({ clearedEntries: 0, unregistered: false });
    expect(await vdcm.unassignMdev(m3)).toEqual({ clearedEntries: 0, unregistered: true });
    expect(registeredSets(core)).toEqual([VM2]);
    expect(vdcm.snapshot().registeredSetIds).toEqual([VM2]);
  });

  it("surfaces the core's refusal to register on a non-empty set (SET_NOT_EMPTY) and an unknown set (SET_NOT_FOUND)", async () => {
    const { core, vdcm } = await setup();
    const m3 = (await vdcm.createMdev(DEV, "", [2])).mdevUuid;
    const nonEmpty = core.space.createSet({ token: { type: TokenType.MM, value: 90n }, quota: 4 }).id;
    core.space.alloc(nonEmpty);
    const unknown = nonEmpty + 1; // never created
    await refused(vdcm.assignMdev(m3, nonEmpty), Code.FAILED_PRECONDITION, "SET_NOT_EMPTY");
    await refused(vdcm.assignMdev(m3, unknown), Code.NOT_FOUND, "SET_NOT_FOUND");
    expect(vdcm.state.getMdev(m3)!.setId).toBe(0);
    expect(vdcm.snapshot().registeredSetIds).toEqual([VM1, VM2]);
  });

  it("unassigning clears the mdev's programmed PASIDs, releasing their references", async () => {
    const { core, vdcm, history } = await setup();
    alloc(core, VM1, 201, 101);
    alloc(core, VM1, 203, 103);
    await vdcm.writeWqPasid(M1, 0, 101);
    await vdcm.writeWqPasid(M1, 2, 103);
    await refused(vdcm.destroyMdev(M1), Code.FAILED_PRECONDITION, "MDEV_ASSIGNED");
    expect(await vdcm.unassignMdev(M1)).toEqual({ clearedEntries: 2, unregistered: true });
    expect(holders(core, 201)).toEqual({ "set-owner": 1 });
    expect(holders(core, 203)).toEqual({ "set-owner": 1 });
    expect(history.filter((h) => h.action === "vdevClear")).toHaveLength(2);
    await vdcm.destroyMdev(M1);
    await refused(vdcm.writeWqPasid(M1, 0, 101), Code.NOT_FOUND, "MDEV_NOT_FOUND");
    await refused(vdcm.unassignMdev(M1), Code.NOT_FOUND, "MDEV_NOT_FOUND");
    await refused(vdcm.unassignMdev(""), Code.INVALID_ARGUMENT, "INVALID_FIELD");
  });
});

describe("Vdcm stale contexts (an IOASID reused while the device still has the old one)", () => {
  /**
   * Simulates an operator force-release: IOASID 201 is freed, every reference on it dropped (so it
   * is reclaimed while the device still has its context), and it is reallocated to VM2 as SPID 555.
   */
  const reuseForVm2 = (core: InProcessCore) => {
    const before = core.space.describe(201)!;
    core.space.free(before.setId, 201);
    for (const h of before.holders) {
      if (h.holder.role === OWNER_ROLE) continue;
      for (let i = 0; i < h.count; i++) core.space.put(before.setId, 201, h.holder);
    }
    expect(exists(core, 201)).toBe(false);
    return alloc(core, VM2, 201, 555);
  };

  it("refuses to program a PASID a descriptor of another guest is still using", async () => {
    const { core, vdcm, dma } = await setup();
    alloc(core, VM1, 201, 101);
    const gate = deferred();
    dma.gate = gate.promise;
    const desc = vdcm.submitDescriptor(
      noop({ pasid: 101, pasidSpace: PasidSpace.GUEST, descriptor: { op: DescriptorOp.FILL, srcAddress: 0n, dstAddress: 0n, size: 8n } }),
    );
    await new Promise((r) => setImmediate(r));
    reuseForVm2(core);
    await refused(vdcm.writeWqPasid(M2, 0, 555), Code.FAILED_PRECONDITION, "PASID_IN_USE");
    expect(holders(core, 201)).toEqual({ "set-owner": 1 });
    gate.resolve();
    await desc;
    await vdcm.writeWqPasid(M2, 0, 555);
  });

  it("drops a shared-work-queue descriptor whose PASID another guest's entry still uses", async () => {
    const { core, vdcm, dma } = await setup();
    alloc(core, VM1, 201, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    const gen = reuseForVm2(core);
    await refused(vdcm.submitDescriptor(noop({ mdevUuid: M2, pasid: 201, generation: gen, pasidSpace: PasidSpace.HOST })), Code.FAILED_PRECONDITION, "PASID_IN_USE");
    expect(dma.requests).toEqual([]);
    expect(holders(core, 201)).toEqual({ "set-owner": 1 });
  });
});

describe("Vdcm unassignment drains", () => {
  it("waits for descriptors in flight on the mdev's shared work queue before it returns", async () => {
    const { core, vdcm, dma } = await setup();
    alloc(core, VM1, 201, 101);
    const gate = deferred();
    dma.gate = gate.promise;
    const desc = vdcm.submitDescriptor(
      noop({ pasid: 101, pasidSpace: PasidSpace.GUEST, descriptor: { op: DescriptorOp.FILL, srcAddress: 0n, dstAddress: 0n, size: 8n } }),
    );
    await new Promise((r) => setImmediate(r));
    let done = false;
    const unassign = vdcm.unassignMdev(M1).then(() => (done = true));
    await new Promise((r) => setImmediate(r));
    expect(done).toBe(false);
    gate.resolve();
    await desc;
    await unassign;
    expect(vdcm.state.getMdev(M1)!.setId).toBe(0);
  });
});

describe("Vdcm reconcile", () => {
  it("releases the references and registrations an earlier run left behind", async () => {
    const core = new InProcessCore();
    createSets(core);
    core.space.register({ subscriber: { name: "vdcm", instance: "vdcm0" }, priority: Priority.DEVICE, scope: { kind: "set", setId: VM1 }, events: [EventType.FREE] });
    alloc(core, VM1, 201, 101);
    const stale = { role: "vdcm", instance: "vdcm0", purpose: `${DEV}.wq0` };
    core.space.get(VM1, 201, stale, 0);
    core.space.get(VM1, 201, { ...stale, purpose: `${DEV}.wq2.desc` }, 0);
    core.space.get(VM1, 201, { ...stale, purpose: `${DEV}.wq2.desc` }, 0);
    core.space.get(VM1, 201, { ...stale, instance: "vdcm1" }, 0);
    const vdcm = new Vdcm({ instance: "vdcm0", core, dma: new FakeDma() });
    expect(await vdcm.reconcile()).toEqual({ released: 3, unregistered: 1, cleared: 0 });
    expect(holders(core, 201)).toEqual({ "set-owner": 1, [`vdcm/vdcm1/${DEV}.wq0`]: 1 });
    expect(core.space.listRegistrations()).toEqual([]);
  });

  it("comes back from its store with its devices, mdevs, programmed PASIDs and registrations, keeping the references they back", async () => {
    const store = new MemoryRoleState(vdcmStateCodec);
    const { core, vdcm: first } = await setup({ store });
    alloc(core, VM1, 201, 101);
    await first.writeWqPasid(M1, 0, 101);
    // A crash: a new process restores from what was written.
    const again = new Vdcm({ instance: "vdcm0", core, dma: new FakeDma(), state: VdcmState.restore(store.saved), store });
    expect(again.snapshot()).toEqual(first.snapshot());
    expect(await again.reconcile()).toEqual({ released: 0, unregistered: 0, cleared: 0 });
    expect(again.snapshot().devices[0]!.pasidEntries.map((e) => [e.hpasid, e.wqId, e.state])).toEqual([[201, 0, EntryState.PROGRAMMED]]);
    expect(holders(core, 201)).toEqual({ "set-owner": 1, [`vdcm/vdcm0/${DEV}.wq0`]: 1 });
    // Its FREE (delivered again after the restart) clears the device and releases with the ack.
    freeIoasid(core, 201);
    expect((await again.onIoasidEvent(freeEvent(core, 201))).release).toEqual([`${DEV}.wq0`]);
    expect(VdcmState.restore(store.saved).snapshot().devices[0]!.pasidEntries).toEqual([]);
  });

  it("acknowledges a FREE only once the clear it relies on is kept, even one made by another call", async () => {
    // Chaos soak, seed 21: an mdev_clear cleared the entry in memory, its store write hung; the FREE
    // found nothing to clear and was acknowledged; VDCM then fail-stopped, came back with the entry
    // (never kept cleared), and nothing was left to deliver the FREE again.
    const saved = new MemoryRoleState(vdcmStateCodec);
    const gate: { hold?: Promise<void> } = {};
    const store: RoleStatePort<VdcmKeptEntry> = {
      write: async (changes) => {
        await gate.hold;
        await saved.write(changes);
      },
    };
    const { core, vdcm } = await setup({ store });
    alloc(core, VM1, 201, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    let open!: () => void;
    gate.hold = new Promise<void>((resolve) => (open = resolve));
    const clearing = vdcm.clearWqPasid(M1, 0);
    await new Promise((r) => setImmediate(r));
    expect(vdcm.snapshot().devices[0]!.pasidEntries).toEqual([]); // cleared in memory, not kept yet
    freeIoasid(core, 201);
    let acked = false;
    const ack = vdcm.onIoasidEvent(freeEvent(core, 201)).then((a) => {
      acked = true;
      return a;
    });
    await new Promise((r) => setTimeout(r, 20));
    expect(acked).toBe(false);
    open();
    expect(await ack).toEqual({ release: [] }); // the mdev_clear releases its own reference
    expect(await clearing).toMatchObject({ cleared: true });
    expect(VdcmState.restore(saved.saved).snapshot().devices[0]!.pasidEntries).toEqual([]);
  });

  it("clears, after a restart, a programmed entry whose reference the core no longer records", async () => {
    const store = new MemoryRoleState(vdcmStateCodec);
    const { core, vdcm } = await setup({ store });
    alloc(core, VM1, 201, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    // An operator force-released VDCM's reference while it was down.
    core.space.put(VM1, 201, { role: "vdcm", instance: "vdcm0", purpose: `${DEV}.wq0` }, 0);
    const again = new Vdcm({ instance: "vdcm0", core, dma: new FakeDma(), state: VdcmState.restore(store.saved), store });
    expect(await again.reconcile()).toEqual({ released: 0, unregistered: 0, cleared: 1 });
    expect(again.snapshot().devices[0]!.pasidEntries).toEqual([]);
    expect(VdcmState.restore(store.saved).snapshot().devices[0]!.pasidEntries).toEqual([]);
  });
});

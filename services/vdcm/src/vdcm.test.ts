import { MemoryRoleState, type HistoryActionCase, type HistoryActionInput, type RoleStatePort } from "@ioasid/bus";
import { describe, expect, it } from "vitest";
import { Code, DomainError } from "@ioasid/errors";
import { CompletionStatus, DescriptorOp, type DmaRequest, type DmaResult, type DmaTranslator } from "./descriptor-runner.js";
import type { HeldReference, HistoryFields, Holder, IoasidPort, NotifierPort } from "./ports.js";
import { PasidSpace, Vdcm, type Submission } from "./vdcm.js";
import { EntryState, VdcmState, WqMode } from "./vdcm-state.js";

// In-memory stand-ins for the core, the IOMMU and the registrations: the Vdcm orchestration is
// tested here without sockets; test/integration/vdcm.test.ts runs it against the real core.

const DEV = "0000:6a:01.0";
const M1 = "11111111-1111-4111-8111-111111111111";
const M2 = "22222222-2222-4222-8222-222222222222";
const VM1 = 7;
const VM2 = 8;

const key = (h: Holder) => `${h.role}/${h.instance}/${h.purpose}`;

function coreError(code: number, reason: string): DomainError {
  return new DomainError(code as Code, reason, reason.toLowerCase());
}

interface FakeIoasid {
  readonly setId: number;
  readonly generation: number;
  freePending: boolean;
  spid: number;
  readonly holders: Map<string, number>;
}

/** A small IOASID core: sets, SPIDs, FREE_PENDING, references per named holder. */
class FakeCore implements IoasidPort {
  readonly ids = new Map<number, FakeIoasid>();
  readonly generations = new Map<number, number>();
  readonly calls: string[] = [];
  /** Puts that fail UNAVAILABLE before any is made (the core unreachable). */
  failPuts = 0;
  /** The next findBySpid takes the reference, then its answer is lost (UNAVAILABLE). */
  loseFindAnswer = false;
  /** When set, findBySpid answers only once it settles (after taking the reference: a slow reply). */
  slowReply: Promise<void> | undefined;

  alloc(setId: number, ioasid: number, spid = 0): number {
    const generation = (this.generations.get(ioasid) ?? 0) + 1;
    this.generations.set(ioasid, generation);
    this.ids.set(ioasid, { setId, generation, freePending: false, spid, holders: new Map([["set-owner", 1]]) });
    return generation;
  }

  free(ioasid: number): void {
    const x = this.ids.get(ioasid)!;
    x.freePending = true;
    this.drop(ioasid, "set-owner");
  }

  refcount(ioasid: number): number {
    let n = 0;
    for (const c of this.ids.get(ioasid)?.holders.values() ?? []) n += c;
    return n;
  }

  holders(ioasid: number): Record<string, number> {
    return Object.fromEntries(this.ids.get(ioasid)?.holders ?? []);
  }

  async findBySpid(setId: number, spid: number, holder: Holder) {
    this.calls.push(`findBySpid ${setId} ${spid}`);
    const found = [...this.ids].find(([, x]) => x.setId === setId && x.spid === spid && spid !== 0);
    if (found === undefined) throw coreError(Code.NOT_FOUND, "SPID_NOT_FOUND");
    const [ioasid, x] = found;
    if (x.freePending) throw coreError(Code.NOT_FOUND, "IOASID_FREE_PENDING");
    x.holders.set(key(holder), (x.holders.get(key(holder)) ?? 0) + 1);
    if (this.loseFindAnswer) {
      this.loseFindAnswer = false;
      throw coreError(Code.UNAVAILABLE, "UNAVAILABLE");
    }
    const refcount = this.refcount(ioasid);
    await this.slowReply;
    return { ioasid, generation: x.generation, refcount };
  }

  async find(setId: number, ioasid: number, generation: number) {
    this.calls.push(`find ${setId} ${ioasid}`);
    return { generation: this.resolve(setId, ioasid, generation, true).generation };
  }

  async get(setId: number, ioasid: number, holder: Holder, generation: number) {
    this.calls.push(`get ${setId} ${ioasid}`);
    const x = this.resolve(setId, ioasid, generation, true);
    x.holders.set(key(holder), (x.holders.get(key(holder)) ?? 0) + 1);
    return { refcount: this.refcount(ioasid) };
  }

  async put(setId: number, ioasid: number, holder: Holder, generation: number) {
    this.calls.push(`put ${setId} ${ioasid} ${holder.purpose}`);
    if (this.failPuts > 0) {
      this.failPuts--;
      throw coreError(Code.UNAVAILABLE, "UNAVAILABLE");
    }
    const x = this.resolve(setId, ioasid, generation, false);
    if ((x.holders.get(key(holder)) ?? 0) === 0) throw coreError(Code.FAILED_PRECONDITION, "NO_REFERENCE_HELD");
    this.drop(ioasid, key(holder));
    return { refcount: this.refcount(ioasid), reclaimed: !this.ids.has(ioasid) };
  }

  async listHeld(setId: number, role: string, instance: string): Promise<HeldReference[]> {
    const out: HeldReference[] = [];
    for (const [ioasid, x] of this.ids) {
      if (x.setId !== setId) continue;
      for (const [k, count] of x.holders) {
        const [r, i, purpose] = k.split("/");
        if (r === role && i === instance) out.push({ setId, ioasid, generation: x.generation, purpose: purpose!, count });
      }
    }
    return out;
  }

  private resolve(setId: number, ioasid: number, generation: number, live: boolean): FakeIoasid {
    const x = this.ids.get(ioasid);
    if (x === undefined) throw coreError(Code.NOT_FOUND, "IOASID_NOT_FOUND");
    if (x.setId !== setId) throw coreError(Code.PERMISSION_DENIED, "IOASID_NOT_IN_SET");
    if (generation !== 0 && generation !== x.generation) throw coreError(Code.FAILED_PRECONDITION, "STALE_GENERATION");
    if (live && x.freePending) throw coreError(Code.NOT_FOUND, "IOASID_FREE_PENDING");
    return x;
  }

  private drop(ioasid: number, holder: string): void {
    const x = this.ids.get(ioasid)!;
    const n = (x.holders.get(holder) ?? 0) - 1;
    if (n <= 0) x.holders.delete(holder);
    else x.holders.set(holder, n);
    if (x.holders.size === 0) this.ids.delete(ioasid);
  }
}

class FakeNotifier implements NotifierPort {
  readonly registrations = new Map<number, number>();
  readonly nonEmpty = new Set<number>();
  readonly unknown = new Set<number>();
  private next = 1;
  async register(setId: number): Promise<number> {
    if (this.unknown.has(setId)) throw coreError(Code.INVALID_ARGUMENT, "SET_UNKNOWN");
    if (this.nonEmpty.has(setId)) throw coreError(Code.FAILED_PRECONDITION, "SET_NOT_EMPTY");
    const id = this.next++;
    this.registrations.set(id, setId);
    return id;
  }
  async unregister(registrationId: number): Promise<void> {
    this.registrations.delete(registrationId);
  }
  async listOwn() {
    return [...this.registrations].map(([registrationId, setId]) => ({ registrationId, setId }));
  }
}

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
async function setup(options: { store?: RoleStatePort } = {}) {
  const core = new FakeCore();
  const notifier = new FakeNotifier();
  const dma = new FakeDma();
  const history: Array<{ action: HistoryActionCase; step: HistoryActionInput } & HistoryFields> = [];
  const vdcm = new Vdcm({ instance: "vdcm0", ioasids: core, notifier, dma, history: { record: (step, f) => history.push({ action: step.$case, step, ...f }) }, ...options });
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
  return { core, notifier, dma, history, vdcm };
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
    core.alloc(VM1, 201, 101);
    const entry = await vdcm.writeWqPasid(M1, 0, 101);
    expect(entry).toMatchObject({ hpasid: 201, gpasid: 101, setId: VM1, wqId: 0, mdevUuid: M1, state: EntryState.PROGRAMMED });
    expect(core.holders(201)).toEqual({ "set-owner": 1, [`vdcm/vdcm0/${DEV}.wq0`]: 1 });
    expect(vdcm.snapshot().devices[0]!.wqs[0]!.hpasid).toBe(201);
    expect(history).toEqual([expect.objectContaining({ action: "vdevWrite", ioasid: 201, spid: 101, setId: VM1, refcount: 2 })]);
  });

  it("refuses a guest PASID never bound, or being freed, and programs nothing", async () => {
    const { core, vdcm } = await setup();
    await refused(vdcm.writeWqPasid(M1, 0, 101), Code.NOT_FOUND, "SPID_NOT_FOUND");
    core.alloc(VM1, 201, 101);
    await core.get(VM1, 201, { role: "iommu", instance: "i", purpose: "p" }, 0);
    core.free(201);
    await refused(vdcm.writeWqPasid(M1, 0, 101), Code.NOT_FOUND, "IOASID_FREE_PENDING");
    expect(vdcm.snapshot().devices[0]!.pasidEntries).toEqual([]);
    // The work queue was not left reserved.
    core.alloc(VM1, 202, 102);
    await vdcm.writeWqPasid(M1, 0, 102);
  });

  it("puts the reference back when the device refuses the PASID (PASID_IN_USE)", async () => {
    const { core, vdcm } = await setup();
    core.alloc(VM1, 201, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    // An operator force-released VDCM's reference, the IOASID was reclaimed and VM2 got it.
    await core.put(VM1, 201, { role: "vdcm", instance: "vdcm0", purpose: `${DEV}.wq0` }, 0);
    core.free(201);
    core.alloc(VM2, 201, 555);
    await refused(vdcm.writeWqPasid(M2, 0, 555), Code.FAILED_PRECONDITION, "PASID_IN_USE");
    expect(core.holders(201)).toEqual({ "set-owner": 1 });
    expect(vdcm.snapshot().devices[0]!.pasidEntries.map((e) => [e.setId, e.wqId])).toEqual([[VM1, 0]]);
  });

  it("keeps retrying, on its timer, the put of a cleared entry while the core is unreachable", async () => {
    const { core, vdcm } = await setup();
    core.alloc(VM1, 201, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    core.failPuts = 5; // the clear's three attempts and the first retry fail
    expect(await vdcm.clearWqPasid(M1, 0)).toMatchObject({ cleared: true });
    expect(core.holders(201)).toEqual({ "set-owner": 1, [`vdcm/vdcm0/${DEV}.wq0`]: 1 });
    expect(vdcm.pendingPutCount).toBe(1);
    expect(await vdcm.retryPendingPuts()).toBe(1);
    expect(await vdcm.retryPendingPuts()).toBe(1);
    expect(await vdcm.retryPendingPuts()).toBe(0);
    expect(core.holders(201)).toEqual({ "set-owner": 1 });
    // A FREE now reclaims at once: nothing of VDCM's is left.
    core.free(201);
    expect(core.ids.has(201)).toBe(false);
  });

  it("releases, on its timer, a reference the core took for a write whose answer was lost, and keeps the ones entries back", async () => {
    const { core, vdcm } = await setup();
    core.alloc(VM1, 201, 101);
    core.alloc(VM1, 202, 102);
    await vdcm.writeWqPasid(M1, 2, 102); // a programmed entry (device wq 3): its reference stays
    core.loseFindAnswer = true;
    await refused(vdcm.writeWqPasid(M1, 0, 101), Code.UNAVAILABLE, "UNAVAILABLE");
    expect(core.holders(201)).toEqual({ "set-owner": 1, [`vdcm/vdcm0/${DEV}.wq0`]: 1 }); // held by nobody
    expect(vdcm.pendingPutCount).toBe(1);
    expect(await vdcm.retryPendingPuts()).toBe(0);
    expect(core.holders(201)).toEqual({ "set-owner": 1 });
    expect(core.holders(202)).toEqual({ "set-owner": 1, [`vdcm/vdcm0/${DEV}.wq3`]: 1 });
    // The guest's retry then programs it.
    await vdcm.writeWqPasid(M1, 0, 101);
    expect(core.holders(201)).toEqual({ "set-owner": 1, [`vdcm/vdcm0/${DEV}.wq0`]: 1 });
  });

  it("clears by draining the work queue first, then clears the entry, then puts", async () => {
    const { core, vdcm, dma, history } = await setup();
    core.alloc(VM1, 201, 101);
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
    expect(core.calls.at(-1)).toBe(`put ${VM1} 201 ${DEV}.wq0`);
    expect(core.holders(201)).toEqual({ "set-owner": 1 });
    expect(await vdcm.clearWqPasid(M1, 0)).toEqual({ cleared: false, entry: undefined });
  });
});

const FREE = (ioasid: number, generation: number, setId: number, seq = 50) => ({ type: "FREE", seq, ioasid, generation, setId, spid: 101 });

describe("Vdcm FREE handler (misbehaving-guest table steps 21/24)", () => {
  it("drains and clears every entry using the PASID and releases their references with the ack; a redelivery releases nothing", async () => {
    const { core, vdcm, history } = await setup();
    const gen = core.alloc(VM1, 201, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    await vdcm.writeWqPasid(M1, 2, 101);
    core.free(201);
    const ack = await vdcm.onIoasidEvent(FREE(201, gen, VM1));
    expect(ack.release.sort()).toEqual([`${DEV}.wq0`, `${DEV}.wq3`]);
    expect(vdcm.snapshot().devices[0]!.pasidEntries).toEqual([]);
    expect(history.filter((h) => h.action === "vdevClear")).toEqual([
      expect.objectContaining({ ioasid: 201, seq: 50, setId: VM1 }),
      expect.objectContaining({ ioasid: 201, seq: 50, setId: VM1 }),
    ]);
    expect(await vdcm.onIoasidEvent(FREE(201, gen, VM1))).toEqual({ release: [] });
    // The core releases them with the acknowledgement: the last one reclaims.
    for (const purpose of ack.release) await core.put(VM1, 201, { role: "vdcm", instance: "vdcm0", purpose }, gen);
    expect(core.ids.has(201)).toBe(false);
  });

  it("ignores other events and other generations", async () => {
    const { core, vdcm } = await setup();
    const gen = core.alloc(VM1, 201, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    expect(await vdcm.onIoasidEvent({ ...FREE(201, gen, VM1), type: "UNBIND" })).toEqual({ release: [] });
    expect(await vdcm.onIoasidEvent(FREE(201, gen + 1, VM1))).toEqual({ release: [] });
    expect(await vdcm.onIoasidEvent(FREE(201, gen, VM2))).toEqual({ release: [] });
    expect(vdcm.snapshot().devices[0]!.pasidEntries).toHaveLength(1);
  });

  it("waits for a write whose reference was taken before the free, then clears what it programmed", async () => {
    const { core, vdcm } = await setup();
    const gen = core.alloc(VM1, 201, 101);
    const reply = deferred();
    core.slowReply = reply.promise;
    const write = vdcm.writeWqPasid(M1, 0, 101);
    await new Promise((r) => setImmediate(r));
    expect(core.holders(201)[`vdcm/vdcm0/${DEV}.wq0`]).toBe(1);
    core.free(201);
    let acked = false;
    const free = vdcm.onIoasidEvent(FREE(201, gen, VM1)).then((a) => ((acked = true), a));
    await new Promise((r) => setImmediate(r));
    expect(acked).toBe(false);
    reply.resolve();
    await write;
    expect(await free).toEqual({ release: [`${DEV}.wq0`] });
    expect(vdcm.snapshot().devices[0]!.pasidEntries).toEqual([]);
  });

  it("leaves a clear in progress its release: one put, never two", async () => {
    const { core, vdcm, dma } = await setup();
    const gen = core.alloc(VM1, 201, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    dma.mapped.add("201:0");
    const gate = deferred();
    dma.gate = gate.promise;
    const desc = vdcm.submitDescriptor(noop({ virtualWq: 0, descriptor: { op: DescriptorOp.FILL, srcAddress: 0n, dstAddress: 0n, size: 8n } }));
    const clear = vdcm.clearWqPasid(M1, 0);
    await Promise.resolve();
    core.free(201);
    const free = vdcm.onIoasidEvent(FREE(201, gen, VM1));
    gate.resolve();
    await desc;
    expect(await clear).toMatchObject({ cleared: true });
    expect(await free).toEqual({ release: [] });
    expect(core.calls.filter((c) => c.startsWith("put"))).toEqual([`put ${VM1} 201 ${DEV}.wq0`]);
    expect(core.ids.has(201)).toBe(false);
  });

  it("drains descriptors in flight on shared work queues with the PASID before acknowledging", async () => {
    const { core, vdcm, dma } = await setup();
    const gen = core.alloc(VM1, 201, 101);
    dma.mapped.add("201:0");
    const gate = deferred();
    dma.gate = gate.promise;
    const desc = vdcm.submitDescriptor(
      noop({ virtualWq: 1, pasid: 101, pasidSpace: PasidSpace.GUEST, descriptor: { op: DescriptorOp.FILL, srcAddress: 0n, dstAddress: 0n, size: 8n } }),
    );
    await new Promise((r) => setImmediate(r));
    core.free(201);
    let acked = false;
    const free = vdcm.onIoasidEvent(FREE(201, gen, VM1)).then(() => (acked = true));
    await new Promise((r) => setImmediate(r));
    expect(acked).toBe(false);
    gate.resolve();
    await desc;
    await free;
    expect(core.ids.has(201)).toBe(false);
  });
});

describe("Vdcm descriptor submission", () => {
  it("translates a shared work queue's guest PASID, holds a reference while it runs, then puts it", async () => {
    const { core, vdcm, dma, history } = await setup();
    const gen = core.alloc(VM1, 201, 101);
    dma.mapped.add("201:0").add("201:1");
    const gate = deferred();
    dma.gate = gate.promise;
    const run = vdcm.submitDescriptor(
      noop({ pasid: 101, pasidSpace: PasidSpace.GUEST, descriptor: { op: DescriptorOp.MEMMOVE, srcAddress: 0n, dstAddress: 4096n, size: 4096n } }),
    );
    await new Promise((r) => setImmediate(r));
    expect(core.holders(201)[`vdcm/vdcm0/${DEV}.wq2.desc`]).toBe(1);
    gate.resolve();
    expect(await run).toEqual({ hpasid: 201, generation: gen, status: CompletionStatus.SUCCESS, bytesCompleted: 4096n, faultAddress: 0n, faultGroupId: 0n });
    expect(core.holders(201)).toEqual({ "set-owner": 1 });
    expect(dma.requests.map((r) => [r.pasid, r.address, r.write])).toEqual([
      [201, 0n, false],
      [201, 4096n, true],
    ]);
    expect(history.at(-1)).toMatchObject({ action: "submit", ioasid: 201, spid: 101, setId: VM1 });
  });

  it("drops an untranslatable descriptor with the error: nothing reaches the device", async () => {
    const { core, vdcm, dma, history } = await setup();
    const g1 = core.alloc(VM1, 201, 101);
    core.alloc(VM2, 202, 101);
    await refused(vdcm.submitDescriptor(noop({ pasid: 999, pasidSpace: PasidSpace.GUEST })), Code.NOT_FOUND, "SPID_NOT_FOUND");
    // VM2 names VM1's host PASID on its own mdev: another set's IOASID.
    await refused(vdcm.submitDescriptor(noop({ mdevUuid: M2, pasid: 201, pasidSpace: PasidSpace.HOST })), Code.PERMISSION_DENIED, "IOASID_NOT_IN_SET");
    await refused(vdcm.submitDescriptor(noop({ pasid: 201, pasidSpace: PasidSpace.HOST, generation: g1 + 1 })), Code.FAILED_PRECONDITION, "STALE_GENERATION");
    await refused(vdcm.submitDescriptor(noop({ pasid: 555, pasidSpace: PasidSpace.HOST })), Code.NOT_FOUND, "IOASID_NOT_FOUND");
    await core.get(VM1, 201, { role: "iommu", instance: "i", purpose: "p" }, 0);
    core.free(201);
    await refused(vdcm.submitDescriptor(noop({ pasid: 101, pasidSpace: PasidSpace.GUEST })), Code.NOT_FOUND, "IOASID_FREE_PENDING");
    expect(dma.requests).toEqual([]);
    expect(history.map((h) => h.action)).toEqual(["submit", "submit", "submit", "submit", "submit"]);
    expect(history.every((h) => h.ioasid === undefined && h.step.$case === "submit" && h.step.value.dropped === true)).toBe(true);
    expect(core.holders(202)).toEqual({ "set-owner": 1 });
  });

  it("runs a host PASID (ENQCMD-translated) of the mdev's own set", async () => {
    const { core, vdcm } = await setup();
    const gen = core.alloc(VM2, 202, 101);
    expect(await vdcm.submitDescriptor(noop({ mdevUuid: M2, pasid: 202, pasidSpace: PasidSpace.HOST }))).toMatchObject({
      hpasid: 202,
      generation: gen,
      status: CompletionStatus.SUCCESS,
    });
    expect(core.holders(202)).toEqual({ "set-owner": 1 });
  });

  it("reports DMA faults as completion status, with the bytes done before", async () => {
    const { core, vdcm, dma } = await setup();
    core.alloc(VM1, 201, 101);
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
    core.alloc(VM1, 201, 101);
    await refused(vdcm.submitDescriptor(noop({ virtualWq: 0 })), Code.FAILED_PRECONDITION, "WQ_PASID_NOT_PROGRAMMED");
    await refused(vdcm.submitDescriptor(noop({ virtualWq: 0, pasid: 101 })), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(vdcm.submitDescriptor(noop({ pasid: 101 })), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(vdcm.submitDescriptor(noop({ pasidSpace: PasidSpace.GUEST })), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(vdcm.submitDescriptor(noop({ pasid: 1 << 20, pasidSpace: PasidSpace.GUEST })), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(vdcm.submitDescriptor(noop({ pasid: 101, pasidSpace: PasidSpace.GUEST, descriptor: undefined })), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(vdcm.submitDescriptor(noop({ virtualWq: 9 })), Code.NOT_FOUND, "WQ_NOT_FOUND");
    await refused(vdcm.submitDescriptor(noop({ mdevUuid: "33333333-3333-4333-8333-333333333333" })), Code.NOT_FOUND, "MDEV_NOT_FOUND");
    expect(dma.requests).toEqual([]);
    expect(core.calls).toEqual([]);
  });
});

describe("Vdcm isolation between VMs", () => {
  it("translates a guest PASID in the writing mdev's own set; another VM's clear leaves the first VM's entry alone", async () => {
    const { core, vdcm } = await setup();
    core.alloc(VM1, 201, 101);
    core.alloc(VM2, 202, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    expect(await vdcm.clearWqPasid(M2, 0)).toEqual({ cleared: false, entry: undefined });
    expect((await vdcm.writeWqPasid(M2, 0, 101)).hpasid).toBe(202);
    expect(vdcm.snapshot().devices[0]!.pasidEntries.map((e) => [e.hpasid, e.setId, e.mdevUuid])).toEqual([
      [201, VM1, M1],
      [202, VM2, M2],
    ]);
    expect(core.holders(201)).toEqual({ "set-owner": 1, [`vdcm/vdcm0/${DEV}.wq0`]: 1 });
  });
});

describe("Vdcm assignment and registration", () => {
  it("registers on a set with its first mdev and withdraws with its last", async () => {
    const { vdcm, notifier } = await setup();
    expect([...notifier.registrations.values()].sort()).toEqual([VM1, VM2]);
    const m3 = (await vdcm.createMdev(DEV, "", [2])).mdevUuid;
    expect((await vdcm.assignMdev(m3, VM1)).registered).toBe(false);
    expect(await vdcm.unassignMdev(M1)).toEqual({ clearedEntries: 0, unregistered: false });
    expect(await vdcm.unassignMdev(m3)).toEqual({ clearedEntries: 0, unregistered: true });
    expect([...notifier.registrations.values()]).toEqual([VM2]);
    expect(vdcm.snapshot().registeredSetIds).toEqual([VM2]);
  });

  it("surfaces the core's refusal to register on a non-empty set (SET_NOT_EMPTY) and an unknown set (SET_NOT_FOUND)", async () => {
    const { vdcm, notifier } = await setup();
    const m3 = (await vdcm.createMdev(DEV, "", [2])).mdevUuid;
    notifier.nonEmpty.add(9);
    notifier.unknown.add(10);
    await refused(vdcm.assignMdev(m3, 9), Code.FAILED_PRECONDITION, "SET_NOT_EMPTY");
    await refused(vdcm.assignMdev(m3, 10), Code.NOT_FOUND, "SET_NOT_FOUND");
    expect(vdcm.state.getMdev(m3)!.setId).toBe(0);
    expect(vdcm.snapshot().registeredSetIds).toEqual([VM1, VM2]);
  });

  it("unassigning clears the mdev's programmed PASIDs, releasing their references", async () => {
    const { core, vdcm, history } = await setup();
    core.alloc(VM1, 201, 101);
    core.alloc(VM1, 203, 103);
    await vdcm.writeWqPasid(M1, 0, 101);
    await vdcm.writeWqPasid(M1, 2, 103);
    await refused(vdcm.destroyMdev(M1), Code.FAILED_PRECONDITION, "MDEV_ASSIGNED");
    expect(await vdcm.unassignMdev(M1)).toEqual({ clearedEntries: 2, unregistered: true });
    expect(core.holders(201)).toEqual({ "set-owner": 1 });
    expect(core.holders(203)).toEqual({ "set-owner": 1 });
    expect(history.filter((h) => h.action === "vdevClear")).toHaveLength(2);
    await vdcm.destroyMdev(M1);
    await refused(vdcm.writeWqPasid(M1, 0, 101), Code.NOT_FOUND, "MDEV_NOT_FOUND");
    await refused(vdcm.unassignMdev(M1), Code.NOT_FOUND, "MDEV_NOT_FOUND");
    await refused(vdcm.unassignMdev(""), Code.INVALID_ARGUMENT, "INVALID_FIELD");
  });
});

describe("Vdcm stale contexts (an IOASID reused while the device still has the old one)", () => {
  /** Simulates an operator force-release: IOASID 201 is reclaimed and reallocated to VM2 as SPID 555. */
  const reuseForVm2 = (core: FakeCore) => {
    core.ids.delete(201);
    return core.alloc(VM2, 201, 555);
  };

  it("refuses to program a PASID a descriptor of another guest is still using", async () => {
    const { core, vdcm, dma } = await setup();
    core.alloc(VM1, 201, 101);
    const gate = deferred();
    dma.gate = gate.promise;
    const desc = vdcm.submitDescriptor(
      noop({ pasid: 101, pasidSpace: PasidSpace.GUEST, descriptor: { op: DescriptorOp.FILL, srcAddress: 0n, dstAddress: 0n, size: 8n } }),
    );
    await new Promise((r) => setImmediate(r));
    reuseForVm2(core);
    await refused(vdcm.writeWqPasid(M2, 0, 555), Code.FAILED_PRECONDITION, "PASID_IN_USE");
    expect(core.holders(201)).toEqual({ "set-owner": 1 });
    gate.resolve();
    await desc;
    await vdcm.writeWqPasid(M2, 0, 555);
  });

  it("drops a shared-work-queue descriptor whose PASID another guest's entry still uses", async () => {
    const { core, vdcm, dma } = await setup();
    core.alloc(VM1, 201, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    const gen = reuseForVm2(core);
    await refused(vdcm.submitDescriptor(noop({ mdevUuid: M2, pasid: 201, generation: gen, pasidSpace: PasidSpace.HOST })), Code.FAILED_PRECONDITION, "PASID_IN_USE");
    expect(dma.requests).toEqual([]);
    expect(core.holders(201)).toEqual({ "set-owner": 1 });
  });
});

describe("Vdcm unassignment drains", () => {
  it("waits for descriptors in flight on the mdev's shared work queue before it returns", async () => {
    const { core, vdcm, dma } = await setup();
    core.alloc(VM1, 201, 101);
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
    const core = new FakeCore();
    const notifier = new FakeNotifier();
    await notifier.register(VM1);
    core.alloc(VM1, 201, 101);
    const stale = { role: "vdcm", instance: "vdcm0", purpose: `${DEV}.wq0` };
    await core.get(VM1, 201, stale, 0);
    await core.get(VM1, 201, { ...stale, purpose: `${DEV}.wq2.desc` }, 0);
    await core.get(VM1, 201, { ...stale, purpose: `${DEV}.wq2.desc` }, 0);
    await core.get(VM1, 201, { ...stale, instance: "vdcm1" }, 0);
    const vdcm = new Vdcm({ instance: "vdcm0", ioasids: core, notifier, dma: new FakeDma() });
    expect(await vdcm.reconcile()).toEqual({ released: 3, unregistered: 1, cleared: 0 });
    expect(core.holders(201)).toEqual({ "set-owner": 1, [`vdcm/vdcm1/${DEV}.wq0`]: 1 });
    expect(notifier.registrations.size).toBe(0);
  });

  it("comes back from its store with its devices, mdevs, programmed PASIDs and registrations, keeping the references they back", async () => {
    const store = new MemoryRoleState();
    const { core, notifier, vdcm: first } = await setup({ store });
    const gen = core.alloc(VM1, 201, 101);
    await first.writeWqPasid(M1, 0, 101);
    // A crash: a new process restores from what was written.
    const again = new Vdcm({ instance: "vdcm0", ioasids: core, notifier, dma: new FakeDma(), state: VdcmState.restore(store.saved), store });
    expect(again.snapshot()).toEqual(first.snapshot());
    expect(await again.reconcile()).toEqual({ released: 0, unregistered: 0, cleared: 0 });
    expect(again.snapshot().devices[0]!.pasidEntries.map((e) => [e.hpasid, e.wqId, e.state])).toEqual([[201, 0, EntryState.PROGRAMMED]]);
    expect(core.holders(201)).toEqual({ "set-owner": 1, [`vdcm/vdcm0/${DEV}.wq0`]: 1 });
    // Its FREE (delivered again after the restart) clears the device and releases with the ack.
    core.free(201);
    expect((await again.onIoasidEvent(FREE(201, gen, VM1))).release).toEqual([`${DEV}.wq0`]);
    expect(VdcmState.restore(store.saved).snapshot().devices[0]!.pasidEntries).toEqual([]);
  });

  it("acknowledges a FREE only once the clear it relies on is kept, even one made by another call", async () => {
    // Chaos soak, seed 21: an mdev_clear cleared the entry in memory, its store write hung; the FREE
    // found nothing to clear and was acknowledged; VDCM then fail-stopped, came back with the entry
    // (never kept cleared), and nothing was left to deliver the FREE again.
    const saved = new MemoryRoleState();
    const gate: { hold?: Promise<void> } = {};
    const store: RoleStatePort = {
      write: async (changes) => {
        await gate.hold;
        await saved.write(changes);
      },
    };
    const { core, vdcm } = await setup({ store });
    const gen = core.alloc(VM1, 201, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    let open!: () => void;
    gate.hold = new Promise<void>((resolve) => (open = resolve));
    const clearing = vdcm.clearWqPasid(M1, 0);
    await new Promise((r) => setImmediate(r));
    expect(vdcm.snapshot().devices[0]!.pasidEntries).toEqual([]); // cleared in memory, not kept yet
    core.free(201);
    let acked = false;
    const ack = vdcm.onIoasidEvent(FREE(201, gen, VM1)).then((a) => {
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
    const store = new MemoryRoleState();
    const { core, notifier, vdcm } = await setup({ store });
    core.alloc(VM1, 201, 101);
    await vdcm.writeWqPasid(M1, 0, 101);
    // An operator force-released VDCM's reference while it was down.
    await core.put(VM1, 201, { role: "vdcm", instance: "vdcm0", purpose: `${DEV}.wq0` }, 0);
    const again = new Vdcm({ instance: "vdcm0", ioasids: core, notifier, dma: new FakeDma(), state: VdcmState.restore(store.saved), store });
    expect(await again.reconcile()).toEqual({ released: 0, unregistered: 0, cleared: 1 });
    expect(again.snapshot().devices[0]!.pasidEntries).toEqual([]);
    expect(VdcmState.restore(store.saved).snapshot().devices[0]!.pasidEntries).toEqual([]);
  });
});

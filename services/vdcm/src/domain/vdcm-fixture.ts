import { type HistoryActionCase, type RoleStatePort } from "@ioasid/bus";
import { expect } from "vitest";
import { DomainError } from "@ioasid/errors";
import { EventType, OWNER_ROLE, TokenType, type IoasidEvent } from "@ioasid/ioasid";
import { InProcessCore } from "@ioasid/testkit";
import { DescriptorOp, type DmaRequest, type DmaResult, type DmaTranslator } from "./descriptor-runner.js";
import type { HistoryFields, Holder, VdcmHistoryAction } from "./ports.js";
import { type Submission } from "./submission.js";
import { Vdcm } from "./vdcm.js";
import type { VdcmKeptEntry } from "./vdcm-kept-entry.js";
import { WqMode } from "./vdcm-model.js";

// The core is the real model (the testkit's InProcessCore); the IOMMU is an in-memory stand-in:
// the Vdcm orchestration is tested here without sockets; test/integration/vdcm.test.ts runs it
// against the core service.
// Shared by the Vdcm tests (vdcm*.test.ts).

export const DEV = "0000:6a:01.0";
export const M1 = "11111111-1111-4111-8111-111111111111";
export const M2 = "22222222-2222-4222-8222-222222222222";
/** The two VMs' sets: the ids the core gives the first two sets it creates ({@link createSets}). */
export const VM1 = 1;
export const VM2 = 2;

/** The VMs' sets, as VFIO creates them (token type MM, a quota each). */
export function createSets(core: InProcessCore): void {
  expect([70n, 80n].map((mm) => core.space.createSet({ token: { type: TokenType.MM, value: mm }, quota: 64 }).id)).toEqual([VM1, VM2]);
}

/** Allocates exactly `ioasid` in the set and attaches the guest PASID `spid` (as VFIO and the IOMMU would). @returns its generation */
export function alloc(core: InProcessCore, setId: number, ioasid: number, spid = 0): number {
  const { generation } = core.space.alloc(setId, { min: ioasid, max: ioasid });
  if (spid !== 0) core.space.attachSpid(setId, ioasid, spid);
  return generation;
}

/** The guest frees the IOASID (VFIO's core Free): FREE_PENDING while referenced, else reclaimed. */
export function freeIoasid(core: InProcessCore, ioasid: number): void {
  core.space.free(core.space.describe(ioasid)!.setId, ioasid);
}

/** The references on the IOASID by holder (`role/instance/purpose`; the allocation reference as "set-owner"). */
export function holders(core: InProcessCore, ioasid: number): Record<string, number> {
  const info = core.space.describe(ioasid);
  return Object.fromEntries(
    (info?.holders ?? []).map((h) => [h.holder.role === OWNER_ROLE ? OWNER_ROLE : `${h.holder.role}/${h.holder.instance}/${h.holder.purpose}`, h.count]),
  );
}

export const exists = (core: InProcessCore, ioasid: number): boolean => core.space.describe(ioasid) !== undefined;

/** The last FREE the core committed for the IOASID, as the bus delivers it to VDCM. */
export function freeEvent(core: InProcessCore, ioasid: number): IoasidEvent {
  const e = core.events.findLast((x) => x.type === EventType.FREE && x.ioasid === ioasid);
  if (e === undefined) throw new Error(`the core committed no FREE of IOASID ${ioasid}`);
  return e;
}

/** The puts VDCM made, as `put <set> <ioasid> <purpose>`. */
export const puts = (core: InProcessCore): string[] =>
  core.requests
    .filter((r) => r.call === "put")
    .map(({ args: [setId, ioasid, holder] }) => `put ${String(setId)} ${String(ioasid)} ${(holder as Holder).purpose}`);

/** VDCM's registrations at the core: the sets they are on. */
export const registeredSets = (core: InProcessCore): number[] =>
  core.space
    .listRegistrations()
    .filter((r) => r.subscriber.name === "vdcm")
    .map((r) => r.setId);

/** An IOMMU whose mapped pages translate; everything else is a fault. */
export class FakeDma implements DmaTranslator {
  readonly mapped = new Set<string>();
  readonly requests: DmaRequest[] = [];
  gate: Promise<void> | undefined;
  async translate(r: DmaRequest): Promise<DmaResult> {
    this.requests.push(r);
    await this.gate;
    return this.mapped.has(`${r.pasid}:${r.address / 4096n}`) ? { outcome: "TRANSLATED" } : { outcome: "FAULT", reason: "NO_PASID_ENTRY" };
  }
}

export function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

export async function refused(p: Promise<unknown>, code: number, reason: string): Promise<void> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(DomainError);
  expect({ code: (err as DomainError).code, reason: (err as DomainError).reason }).toEqual({ code, reason });
}

/** What {@link setup} gives a test. */
export interface VdcmSetup {
  readonly core: InProcessCore;
  readonly dma: FakeDma;
  readonly history: Array<{ action: HistoryActionCase; step: VdcmHistoryAction } & HistoryFields>;
  readonly vdcm: Vdcm;
}

/**
 * VDCM with DEV (dedicated wq 0, 1, 3; shared wq 2); M1 = [wq 0, shared wq 2, wq 3] assigned to
 * VM1, M2 = [wq 1, shared wq 2] assigned to VM2.
 */
export async function setup(options: { store?: RoleStatePort<VdcmKeptEntry> } = {}): Promise<VdcmSetup> {
  const core = new InProcessCore();
  createSets(core);
  const dma = new FakeDma();
  const history: Array<{ action: HistoryActionCase; step: VdcmHistoryAction } & HistoryFields> = [];
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

export const noop = (over: Partial<Submission>): Submission => ({
  mdevUuid: M1,
  virtualWq: 1,
  pasid: 0,
  pasidSpace: undefined,
  generation: 0,
  descriptor: { op: DescriptorOp.NOOP, srcAddress: 0n, dstAddress: 0n, size: 0n },
  ...over,
});

/** A FREE as the bus delivers it, for events the core did not commit (another generation, another set). */
export const FREE = (ioasid: number, generation: number, setId: number, seq = 50) => ({ type: "FREE", seq, ioasid, generation, setId, spid: 101 });

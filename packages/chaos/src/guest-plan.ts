import { createPrng, type Prng } from "./prng.js";

/** What a guest is given: its slot's mediated device (through VDCM), or its slot's PRI-capable PF. */
export const GuestDevice = {
  MDEV: "mdev",
  PF: "pf",
} as const;
export type GuestDevice = (typeof GuestDevice)[keyof typeof GuestDevice];

/**
 * One step of a guest's life, as planned. PASIDs are named by the guest's own numbering: `pasid` k
 * is the k-th allocation of the guest (0, 1, …), whatever host PASID it gets; its guest PASID is
 * {@link gpasidOf}(k). Work queues are the mdev's virtual dedicated WQs 0 and 1 (WQ 2 is shared).
 */
export type GuestStep =
  /** VFIO AssignDevice of the slot's mdev or PF. */
  | { readonly kind: "assign"; readonly device: GuestDevice }
  /** VFIO MapDma of guest RAM into the VM's stage 2. */
  | { readonly kind: "map-dma" }
  /** Virtual-command PASID allocation. */
  | { readonly kind: "alloc"; readonly pasid: number }
  /** bind_gpasid on the mdev (its parent device) or the PF. */
  | { readonly kind: "bind"; readonly pasid: number; readonly device: GuestDevice }
  /** The guest's MMIO write of the PASID's gpasid into a dedicated virtual WQ. */
  | { readonly kind: "program"; readonly pasid: number; readonly wq: number }
  /** A vCPU's ENQCMD with the gpasid; `submit`: a translated one is then submitted to the shared WQ. */
  | { readonly kind: "enqcmd"; readonly pasid: number; readonly submit: boolean }
  /** Device DMA under the PASID: a descriptor on a programmed WQ (mdev), or a Translate (PF). */
  | { readonly kind: "dma"; readonly pasid: number; readonly device: GuestDevice; readonly wq?: number; readonly page: number }
  /** The guest's MMIO write clearing a dedicated virtual WQ's PASID. */
  | { readonly kind: "clear"; readonly wq: number }
  /** unbind_gpasid on one device. */
  | { readonly kind: "unbind"; readonly pasid: number; readonly device: GuestDevice }
  /** Virtual-command PASID free (also before unbind: the misbehaving guest). */
  | { readonly kind: "free"; readonly pasid: number }
  /**
   * VFIO ReplaceDeviceDomain of the PF (issue 16: the iommufd replace as a nemesis move): its
   * requests without PASID to a nested domain over the stage 2 (`nested`), or back to the stage 2,
   * in one step while the guest's PASIDs are bound and its DMA runs.
   */
  | { readonly kind: "replace"; readonly nested: boolean }
  /**
   * The guest's vIOMMU overflowing (issue 16): a vIOMMU, a vdevice for the PF and an event queue of
   * depth 2 through VFIO, the PF's requests without PASID replaced to a nested domain on that
   * vIOMMU, then 4 DMA faults into it: the queue must say it lost events (a LOST_EVENTS marker).
   * Left for the guest's end to tear down (event queue, vdevice, vIOMMU before the stage 2).
   */
  | { readonly kind: "overflow" };

/** A step and the guest's think time before it, in ms. */
export interface PlannedStep {
  readonly step: GuestStep;
  readonly thinkMs: number;
}

/** How a guest's VMM ends. */
export type GuestEnd =
  /** A clean exit after the last step: CloseContainer, then KVM DestroyVm. */
  | { readonly kind: "close" }
  /**
   * The VMM is killed (SIGKILL) before step `atStep` (`steps.length`: after the last one) — or, with
   * `duringMs`, that long after step `atStep` started, while it is in flight.
   */
  | { readonly kind: "crash"; readonly atStep: number; readonly duringMs?: number };

/** A guest's whole life, drawn from the run's seed: the same seed and index give the same plan. */
export interface GuestPlan {
  /** 0, 1, … in start order over the run. */
  readonly index: number;
  /** "g<index>": the `vm` of its chaos records and its VM name. */
  readonly name: string;
  /** The slot it runs in (its mdev and PF), `index mod slots`. */
  readonly slot: number;
  readonly mmToken: bigint;
  /** Its set's quota. */
  readonly quota: number;
  readonly vcpus: number;
  readonly steps: readonly PlannedStep[];
  readonly end: GuestEnd;
  /** Seed of the guest's answers to its page requests (drawn in the order the groups arrive). */
  readonly responderSeed: number;
}

/** Options of {@link planGuest}. */
export interface GuestPlanOptions {
  /** Guests run at once (slots). @default 4 */
  readonly slots?: number;
  /** Fewest and most life-cycle steps after the setup. @default [8, 30] */
  readonly steps?: readonly [number, number];
  /** Chance that the VMM crashes instead of closing. @default 0.4 */
  readonly crashProbability?: number;
  /** Shortest and longest think time before a step, in ms. @default [10, 250] */
  readonly thinkMs?: readonly [number, number];
}

/** The guest PASID of a guest's k-th allocation: 101, 102, … (as the IOASID document's 101). */
export function gpasidOf(pasid: number): number {
  return 101 + pasid;
}

/** The MM token of guest `index` (non-zero, unique within a run). */
export function mmTokenOf(index: number): bigint {
  return 0xc4a0_0000n + BigInt(index) + 1n;
}

/**
 * An independent 32-bit seed for stream `stream` (1: guests, 2: fault proxies…) and item `index`
 * of a run, so that adding a guest or a proxy never shifts another's numbers.
 */
export function deriveSeed(seed: number, stream: number, index: number): number {
  const rng = createPrng((Math.trunc(seed) ^ Math.imul(stream + 1, 0x9e37_79b9) ^ Math.imul(index + 1, 0x85eb_ca6b)) >>> 0);
  rng.next();
  return Math.floor(rng.next() * 0x1_0000_0000) >>> 0;
}

/** The stream of {@link deriveSeed} the guests draw from. */
export const GUEST_STREAM = 1;

const DEDICATED_WQS = [0, 1] as const;

interface SlotModel {
  freed: boolean;
  bound: Set<GuestDevice>;
  wq: number | undefined;
}

/**
 * Plans guest `index` of a run from the run's seed. Pure: the guest's decisions are drawn from its
 * own mulberry32 stream, assuming every step succeeds (a step whose premise failed at run time is
 * then refused by the service, or skipped when it names a PASID that was never allocated).
 * @example
 * const plan = planGuest(7, 0, { slots: 4 });
 * plan.steps.map((s) => s.step.kind); // the same list for seed 7, guest 0, on every machine
 */
export function planGuest(seed: number, index: number, options: GuestPlanOptions = {}): GuestPlan {
  const slots = options.slots ?? 4;
  const [minSteps, maxSteps] = options.steps ?? [8, 30];
  const [minThink, maxThink] = options.thinkMs ?? [10, 250];
  if (!(slots >= 1) || !(minSteps >= 0 && minSteps <= maxSteps) || !(minThink >= 0 && minThink <= maxThink)) {
    throw new RangeError("planGuest: slots ≥ 1 and ranges [min, max] with 0 ≤ min ≤ max");
  }
  const rng = createPrng(deriveSeed(seed, GUEST_STREAM, index));
  const think = () => rng.int(minThink, maxThink);
  const quota = rng.int(4, 8);
  const vcpus = rng.int(1, 4);
  const useMdev = rng.chance(0.85);
  const usePf = !useMdev || rng.chance(0.4);
  const devices: GuestDevice[] = [...(useMdev ? [GuestDevice.MDEV] : []), ...(usePf ? [GuestDevice.PF] : [])];

  const steps: PlannedStep[] = devices.map((device) => ({ step: { kind: "assign", device }, thinkMs: think() }));
  steps.push({ step: { kind: "map-dma" }, thinkMs: think() });

  const model: SlotModel[] = [];
  const wqs = new Map<number, number>(); // programmed virtual WQ → pasid
  const pf = { nested: false, overflowed: false };
  const n = rng.int(minSteps, maxSteps);
  for (let i = 0; i < n; i++) {
    const choices = candidates(model, wqs, devices, quota, rng, pf);
    const total = choices.reduce((s, c) => s + c.weight, 0);
    let x = rng.next() * total;
    const chosen = choices.find((c) => (x -= c.weight) < 0) ?? choices.at(-1)!;
    apply(chosen.step, model, wqs);
    if (chosen.step.kind === "replace") pf.nested = chosen.step.nested;
    if (chosen.step.kind === "overflow") {
      pf.overflowed = true;
      pf.nested = true;
    }
    steps.push({ step: chosen.step, thinkMs: think() });
  }

  const crash = rng.chance(options.crashProbability ?? 0.4);
  const atStep = rng.int(0, steps.length);
  const during = rng.chance(0.5);
  const duringMs = rng.int(0, 15);
  const responderSeed = Math.floor(rng.next() * 0x1_0000_0000) >>> 0;
  return {
    index,
    name: `g${index}`,
    slot: index % slots,
    mmToken: mmTokenOf(index),
    quota,
    vcpus,
    steps,
    end: crash ? { kind: "crash", atStep, ...(during && atStep < steps.length ? { duringMs } : {}) } : { kind: "close" },
    responderSeed,
  };
}

/** Guest index of the run's first probe guest (its MM token stays apart from the drawn guests' for any run under a million guests). */
export const PROBE_INDEX = 1_000_000;

/** PASIDs a probe guest allocates, binds and (the first) programs before its VMM is killed. */
export const PROBE_PASIDS = 2;

/**
 * The probe guest of a run: not drawn, planned — every run of every seed has it, so that every run
 * has a crashed guest holding PASIDs to measure (issue 15: a run whose drawn guests happened not to
 * crash with PASIDs had nothing to time, and its reclaim bound could not be checked). The runner
 * runs it once the final heal is done (every component up: L2's premise), in a slot of its own
 * (`slot`, past the drawn guests' slots): it assigns the slot's mdev, maps guest RAM, allocates
 * {@link PROBE_PASIDS} PASIDs, binds each on the mdev and programs the first into a dedicated work
 * queue (the IOMMU, KVM and VDCM each hold it), then its VMM is killed between steps.
 * @param attempt 1, 2, … (a retry is a new guest: its own name and MM token)
 */
export function planProbeGuest(attempt: number, slot: number): GuestPlan {
  const think = 10;
  const step = (s: GuestStep): PlannedStep => ({ step: s, thinkMs: think });
  const steps: PlannedStep[] = [step({ kind: "assign", device: GuestDevice.MDEV }), step({ kind: "map-dma" })];
  for (let pasid = 0; pasid < PROBE_PASIDS; pasid++) {
    steps.push(step({ kind: "alloc", pasid }), step({ kind: "bind", pasid, device: GuestDevice.MDEV }));
    if (pasid === 0) steps.push(step({ kind: "program", pasid, wq: 0 }));
  }
  const index = PROBE_INDEX + attempt;
  return {
    index,
    name: `probe${attempt}`,
    slot,
    mmToken: mmTokenOf(index),
    quota: PROBE_PASIDS + 2,
    vcpus: 1,
    steps,
    end: { kind: "crash", atStep: steps.length },
    responderSeed: index,
  };
}

interface Choice {
  readonly weight: number;
  readonly step: GuestStep;
}

/** The steps a guest may take next in the model, with their weights (always at least an allocation or a free). */
function candidates(
  model: SlotModel[],
  wqs: Map<number, number>,
  devices: readonly GuestDevice[],
  quota: number,
  rng: Prng,
  pf: { readonly nested: boolean; readonly overflowed: boolean },
): Choice[] {
  const out: Choice[] = [];
  // The PF's nested translation turned on or off (ReplaceDeviceDomain), whatever its PASIDs do;
  // once per guest, its vIOMMU's event queue made to overflow.
  if (devices.includes(GuestDevice.PF)) {
    out.push({ weight: 0.4, step: { kind: "replace", nested: !pf.nested } });
    if (!pf.overflowed) out.push({ weight: 0.3, step: { kind: "overflow" } });
  }
  const live = model.filter((s) => !s.freed).length;
  if (live < quota) out.push({ weight: live === 0 ? 3 : 1.5, step: { kind: "alloc", pasid: model.length } });
  model.forEach((s, pasid) => {
    if (s.freed) {
      // The misbehaving guest: free twice, unbind after free.
      out.push({ weight: 0.1, step: { kind: "free", pasid } });
      out.push({ weight: 0.1, step: { kind: "unbind", pasid, device: rng.pick(devices) } });
      return;
    }
    for (const device of devices) if (!s.bound.has(device)) out.push({ weight: 2.5 / devices.length, step: { kind: "bind", pasid, device } });
    const freeWq = DEDICATED_WQS.find((w) => !wqs.has(w));
    if (s.bound.has(GuestDevice.MDEV) && s.wq === undefined && freeWq !== undefined) out.push({ weight: 3, step: { kind: "program", pasid, wq: freeWq } });
    if (s.bound.size > 0) {
      out.push({ weight: 1, step: { kind: "enqcmd", pasid, submit: s.bound.has(GuestDevice.MDEV) && rng.chance(0.6) } });
      if (s.wq !== undefined) out.push({ weight: 3, step: { kind: "dma", pasid, device: GuestDevice.MDEV, wq: s.wq, page: rng.int(0, 255) } });
      if (s.bound.has(GuestDevice.PF)) out.push({ weight: 3, step: { kind: "dma", pasid, device: GuestDevice.PF, page: rng.int(0, 255) } });
      out.push({ weight: 1, step: { kind: "unbind", pasid, device: rng.pick([...s.bound]) } });
    } else {
      // ENQCMD with a PASID KVM has no translation for: #GP.
      out.push({ weight: 0.3, step: { kind: "enqcmd", pasid, submit: false } });
    }
    out.push({ weight: s.bound.size > 0 ? 0.8 : 1.5, step: { kind: "free", pasid } });
  });
  for (const [wq] of wqs) out.push({ weight: 0.8, step: { kind: "clear", wq } });
  if (out.length === 0) out.push({ weight: 1, step: { kind: "free", pasid: 0 } });
  return out;
}

/** The step's effect on the model, as if it succeeded. */
function apply(step: GuestStep, model: SlotModel[], wqs: Map<number, number>): void {
  const clearWqsOf = (pasid: number) => {
    for (const [w, p] of wqs) if (p === pasid) wqs.delete(w);
    const s = model[pasid];
    if (s !== undefined) s.wq = undefined;
  };
  switch (step.kind) {
    case "alloc":
      model.push({ freed: false, bound: new Set(), wq: undefined });
      return;
    case "bind":
      model[step.pasid]?.bound.add(step.device);
      return;
    case "program":
      wqs.set(step.wq, step.pasid);
      model[step.pasid]!.wq = step.wq;
      return;
    case "clear": {
      const p = wqs.get(step.wq);
      wqs.delete(step.wq);
      if (p !== undefined) model[p]!.wq = undefined;
      return;
    }
    case "unbind":
      model[step.pasid]?.bound.delete(step.device);
      return;
    case "free": {
      // FREE tears down every context of the PASID: VMCS entry, device entries, IOMMU entries.
      const s = model[step.pasid];
      if (s === undefined) return;
      s.freed = true;
      s.bound.clear();
      clearWqsOf(step.pasid);
      return;
    }
    default:
      return;
  }
}

/** A one-line description of a planned step ("bind p1 mdev", "dma p0 pf page 17"). */
export function describeGuestStep(step: GuestStep): string {
  switch (step.kind) {
    case "assign":
      return `assign ${step.device}`;
    case "map-dma":
      return "map-dma";
    case "alloc":
    case "free":
      return `${step.kind} p${step.pasid}`;
    case "bind":
    case "unbind":
      return `${step.kind} p${step.pasid} ${step.device}`;
    case "program":
      return `program p${step.pasid} wq${step.wq}`;
    case "enqcmd":
      return `enqcmd p${step.pasid}${step.submit ? " +submit" : ""}`;
    case "dma":
      return `dma p${step.pasid} ${step.device}${step.wq === undefined ? "" : ` wq${step.wq}`} page ${step.page}`;
    case "clear":
      return `clear wq${step.wq}`;
    case "replace":
      return `replace pf ${step.nested ? "nested" : "stage2"}`;
    case "overflow":
      return "overflow pf veventq";
  }
}

import type { HistoryRecord } from "@ioasid/bus";

/**
 * The history column of the chaos driver: the runner's own records (its operations, Jepsen style,
 * and the faults it injects) share the history stream with the roles' records, so the checker and
 * the timeline see both on one time axis.
 */
export const CHAOS_ROLE = "chaos";

/**
 * What a chaos record says, Jepsen style: an operation is `invoke`d, then completes `ok`, `fail`
 * (it certainly did not happen) or `info` (indeterminate: timed out, the connection broke). `info`
 * also carries the nemesis: fault and heal markers.
 */
export const ChaosAction = {
  INVOKE: "invoke",
  OK: "ok",
  FAIL: "fail",
  INFO: "info",
} as const;
export type ChaosAction = (typeof ChaosAction)[keyof typeof ChaosAction];

/** The guest and VMM operations the driver performs (the `op` of a chaos record). */
export const ChaosOpName = {
  /** VMM opens its VFIO container: the VM's IOASID set appears. */
  OPEN: "open",
  /** Guest virtual-command PASID allocation. */
  ALLOC: "alloc",
  /** bind_gpasid on an assigned device. */
  BIND: "bind",
  /** Guest MMIO write of a gpasid into an mdev work queue (VDCM vdev_write). */
  PROGRAM: "program",
  /** vCPU ENQCMD through KVM's VMCS PASID translation. */
  ENQCMD: "enqcmd",
  /** Device DMA through the IOMMU (may raise a page request). */
  DMA: "dma",
  /** The guest's page response to a fault group. */
  RESPOND: "respond",
  /** Guest clears an mdev work queue's PASID. */
  CLEAR: "clear",
  /** unbind_gpasid. */
  UNBIND: "unbind",
  /** Guest virtual-command PASID free (DESIGN §7 L1 bounds its latency). */
  FREE: "free",
  /** Clean VMM exit: the container closes. */
  CLOSE: "close",
  /** The VMM crashes (its session drops): the crashed-guest path (L2). */
  CRASH: "crash",
} as const;
export type ChaosOpName = (typeof ChaosOpName)[keyof typeof ChaosOpName];

/**
 * The detail of a chaos operation record: a small JSON object. `opId` pairs an invoke with its
 * completion; `vm` names the guest the operation acts for; the IOASID fields name what the
 * operation acted on (known at invoke for most, at `ok` for an allocation).
 */
export interface ChaosOp {
  /** What was done ({@link ChaosOpName}, or another name the runner adds). */
  readonly op: ChaosOpName | (string & {});
  /** Pairs the invoke with its completion: unique within a run. */
  readonly opId: number;
  /** The guest ("g3") the operation is done for. */
  readonly vm?: string;
  /** The VM's IOASID set (on `ok` of `open`, and on every later op of the VM that knows it). */
  readonly setId?: number;
  readonly ioasid?: number;
  readonly generation?: number;
  /** Guest PASID. */
  readonly spid?: number;
  /** Wall-clock duration of the call as the driver measured it, on the completion. */
  readonly latencyMs?: number;
  /** Why it failed (`fail`, `info`): a DomainError reason or a short message. */
  readonly error?: string;
}

/** Fault kinds the nemesis injects (see {@link schedule}). */
export const FaultKind = {
  /** SIGKILL, then restart. */
  KILL_RESTART: "kill-restart",
  /** SIGSTOP, then SIGCONT. */
  STOP_CONT: "stop-cont",
  /** nats-server killed and restarted on the same port and store. */
  NATS_RESTART: "nats-restart",
  /** Latency added on a link through the fault proxy. */
  LATENCY: "latency",
  /** Connections of a link reset at random through the fault proxy. */
  DROP: "drop",
  /** A link partitioned through the fault proxy. */
  PARTITION: "partition",
} as const;
export type FaultKind = (typeof FaultKind)[keyof typeof FaultKind];

/** What a fault is injected into: one of the five services, or nats-server. */
export const ChaosTarget = {
  CORE: "ioasid-core",
  IOMMU: "iommu",
  VFIO: "vfio",
  KVM: "kvm",
  VDCM: "vdcm",
  NATS: "nats",
} as const;
export type ChaosTarget = (typeof ChaosTarget)[keyof typeof ChaosTarget];

/** The five services (fault targets other than nats-server). */
export const SERVICE_TARGETS: readonly ChaosTarget[] = [ChaosTarget.CORE, ChaosTarget.IOMMU, ChaosTarget.VFIO, ChaosTarget.KVM, ChaosTarget.VDCM];

/** The history role a fault target records its steps under (the core records as "ioasid"). */
export function roleOfTarget(target: ChaosTarget): string {
  return target === ChaosTarget.CORE ? "ioasid" : target;
}

/** A proxied link of a service: to NATS, or to its gRPC peers. */
export type ChaosLink = "nats" | "grpc";

/**
 * The start of an injected fault (action `info`). `faultId` pairs it with its {@link HealMarker};
 * a marker without `faultId` is healed only by a heal-all.
 */
export interface FaultMarker {
  readonly fault: FaultKind | (string & {});
  readonly target: ChaosTarget;
  readonly faultId?: number;
  /** For network faults: which link of the target goes through the proxy. */
  readonly link?: ChaosLink;
  readonly latencyMs?: number;
  readonly jitterMs?: number;
  readonly probability?: number;
  /**
   * Set when the runner did not inject it but saw it: `"exit"` — the service exited on its own
   * (the core's fail-stop when its operation log is unwritable) and the runner restarted it, as a
   * supervisor does; recorded as a `kill-restart` so the checker treats it as one.
   */
  readonly cause?: "exit" | (string & {});
}

/** The end of one fault (`faultId`) or, without it, of every fault (the run's final heal). */
export interface HealMarker {
  readonly heal: true;
  readonly faultId?: number;
}

/** Anything the runner notes that is neither an operation nor a fault ("guests started", a seed). */
export interface ChaosNote {
  readonly note: string;
}

/** What the detail of a chaos record holds. */
export type ChaosDetail = ChaosOp | FaultMarker | HealMarker | ChaosNote;

/** A parsed chaos record. */
export type ChaosEntry =
  | { readonly kind: "op"; readonly action: ChaosAction; readonly op: ChaosOp }
  | { readonly kind: "fault"; readonly marker: FaultMarker }
  | { readonly kind: "heal"; readonly marker: HealMarker }
  | { readonly kind: "note"; readonly note: string };

/** Options of {@link createChaosRecord}. */
export interface ChaosRecordOptions {
  /** Record time, ms since the epoch. @default performance.timeOrigin + performance.now() */
  readonly ts?: number;
  /** The driver's instance ("client-3", "nemesis"). @default "nemesis" for fault and heal markers, else "driver" */
  readonly instance?: string;
}

/**
 * Builds one chaos history record. The IOASID fields of an operation are copied to the record's
 * own fields too, so the timeline and `readHistory` filters find the record by IOASID.
 * @example
 * createChaosRecord("invoke", { op: "free", opId: 17, vm: "g3", ioasid: 201, generation: 1 });
 * createChaosRecord("info", { fault: "kill-restart", target: "vdcm", faultId: 4 });
 * createChaosRecord("info", { heal: true });
 * @throws Error when an operation is recorded with `info`'s marker shape or a marker with another action
 */
export function createChaosRecord(action: ChaosAction, detail: ChaosDetail, options: ChaosRecordOptions = {}): HistoryRecord {
  const isMarker = "fault" in detail || "heal" in detail;
  if (isMarker && action !== ChaosAction.INFO) throw new Error(`a fault or heal marker is recorded with action "info", not "${action}"`);
  const ts = options.ts ?? performance.timeOrigin + performance.now();
  const instance = options.instance ?? (isMarker ? "nemesis" : "driver");
  const fields: { ioasid?: number; generation?: number; setId?: number; spid?: number } = {};
  if ("opId" in detail) {
    if (detail.ioasid !== undefined) fields.ioasid = detail.ioasid;
    if (detail.generation !== undefined) fields.generation = detail.generation;
    if (detail.setId !== undefined) fields.setId = detail.setId;
    if (detail.spid !== undefined) fields.spid = detail.spid;
  }
  return { ts, role: CHAOS_ROLE, instance, action, ...fields, detail: JSON.stringify(detail) };
}

/**
 * Reads a chaos record back. Returns undefined for a record of another role, an unknown action, or
 * a detail that is not one of the shapes of {@link ChaosDetail}.
 */
export function parseChaosRecord(record: HistoryRecord): ChaosEntry | undefined {
  if (record.role !== CHAOS_ROLE || !isChaosAction(record.action) || record.detail === undefined) return undefined;
  let value: unknown;
  try {
    value = JSON.parse(record.detail);
  } catch {
    return undefined;
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) return undefined;
  const o = value as Record<string, unknown>;
  if (typeof o["op"] === "string" && typeof o["opId"] === "number") {
    for (const k of ["setId", "ioasid", "generation", "spid", "latencyMs"]) if (o[k] !== undefined && typeof o[k] !== "number") return undefined;
    if (o["vm"] !== undefined && typeof o["vm"] !== "string") return undefined;
    if (o["error"] !== undefined && typeof o["error"] !== "string") return undefined;
    return { kind: "op", action: record.action, op: o as unknown as ChaosOp };
  }
  if (record.action !== ChaosAction.INFO) return undefined;
  if (o["heal"] === true) {
    if (o["faultId"] !== undefined && typeof o["faultId"] !== "number") return undefined;
    return { kind: "heal", marker: o as unknown as HealMarker };
  }
  if (typeof o["fault"] === "string" && typeof o["target"] === "string") {
    if (o["faultId"] !== undefined && typeof o["faultId"] !== "number") return undefined;
    if (o["cause"] !== undefined && typeof o["cause"] !== "string") return undefined;
    return { kind: "fault", marker: o as unknown as FaultMarker };
  }
  if (typeof o["note"] === "string") return { kind: "note", note: o["note"] };
  return undefined;
}

function isChaosAction(action: string): action is ChaosAction {
  return action === "invoke" || action === "ok" || action === "fail" || action === "info";
}

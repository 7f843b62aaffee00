import { chaosPhaseName, createHistoryRecord, type HistoryActionInput, type HistoryFields, type HistoryRecord, type TypedHistoryRecord } from "@ioasid/bus";
import { history as h } from "@ioasid/proto";

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

/**
 * Faults between the hosts of a network-namespace lab (`ioasidctl chaos run --netns`): kept apart
 * from {@link FaultKind}, whose kinds are what `--faults all` draws from, so that a seed's schedule
 * without a lab stays what it was.
 */
export const HostFaultKind = {
  /**
   * The switch drops every frame between two hosts (both directions), or between one host and
   * every other ({@link FaultMarker.hosts} names one): a partition of the NATS cluster's servers.
   */
  HOST_PARTITION: "host-partition",
} as const;
export type HostFaultKind = (typeof HostFaultKind)[keyof typeof HostFaultKind];

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
  /**
   * Which one of a target that has more than one: a NATS cluster's server ("n1"), or the core of a
   * primary and its standby that the fault hit ("a", "b"). Unset on a single server or core.
   */
  readonly node?: string;
  /** A {@link HostFaultKind.HOST_PARTITION}'s hosts: two cut apart, or one cut from every other. */
  readonly hosts?: readonly string[];
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

const PHASE: Record<ChaosAction, h.ChaosPhase> = {
  invoke: h.ChaosPhase.CHAOS_PHASE_INVOKE,
  ok: h.ChaosPhase.CHAOS_PHASE_OK,
  fail: h.ChaosPhase.CHAOS_PHASE_FAIL,
  info: h.ChaosPhase.CHAOS_PHASE_INFO,
};

/** The action of a chaos record's detail (the catalogue's `chaos_op`, `chaos_fault`, `chaos_heal`, `chaos_note`). */
function chaosStep(action: ChaosAction, detail: ChaosDetail): HistoryActionInput {
  if ("opId" in detail) {
    return {
      $case: "chaosOp",
      value: {
        phase: PHASE[action],
        op: detail.op,
        opId: detail.opId,
        ...(detail.vm === undefined ? {} : { vm: detail.vm }),
        ...(detail.latencyMs === undefined ? {} : { latencyMs: detail.latencyMs }),
        ...(detail.error === undefined ? {} : { error: detail.error }),
      },
    };
  }
  if ("fault" in detail) {
    const { fault, target, faultId, link, latencyMs, jitterMs, probability, cause, node, hosts } = detail;
    return { $case: "chaosFault", value: { fault, target, faultId, link, latencyMs, jitterMs, probability, cause, node, hosts: [...(hosts ?? [])] } };
  }
  if ("heal" in detail) return { $case: "chaosHeal", value: detail.faultId === undefined ? {} : { faultId: detail.faultId } };
  return { $case: "chaosNote", value: { note: detail.note } };
}

/**
 * Builds one chaos history record. The IOASID fields of an operation are the record's own fields,
 * so the timeline and `readHistory` filters find the record by IOASID.
 * @example
 * createChaosRecord("invoke", { op: "free", opId: 17, vm: "g3", ioasid: 201, generation: 1 });
 * createChaosRecord("info", { fault: "kill-restart", target: "vdcm", faultId: 4 });
 * createChaosRecord("info", { heal: true });
 * @throws Error when a fault or heal marker is recorded with another action than `info`
 */
export function createChaosRecord(action: ChaosAction, detail: ChaosDetail, options: ChaosRecordOptions = {}): TypedHistoryRecord {
  const isMarker = "fault" in detail || "heal" in detail;
  if (isMarker && action !== ChaosAction.INFO) throw new Error(`a fault or heal marker is recorded with action "info", not "${action}"`);
  const instance = options.instance ?? (isMarker ? "nemesis" : "driver");
  const fields: HistoryFields = {};
  if ("opId" in detail) {
    if (detail.ioasid !== undefined) fields.ioasid = detail.ioasid;
    if (detail.generation !== undefined) fields.generation = detail.generation;
    if (detail.setId !== undefined) fields.setId = detail.setId;
    if (detail.spid !== undefined) fields.spid = detail.spid;
  }
  return createHistoryRecord({ role: CHAOS_ROLE, instance }, chaosStep(action, detail), fields, options.ts);
}

/** Copies the set keys of `o` (a proto message's unset optional fields are undefined). */
function defined<T extends object>(o: T): T {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as T;
}

/**
 * Reads a chaos record back. Returns undefined for a record of another role, or of an action that
 * is not a chaos one (or a chaos operation without its phase).
 */
export function parseChaosRecord(record: HistoryRecord): ChaosEntry | undefined {
  if (record.role !== CHAOS_ROLE) return undefined;
  const a = record.action;
  switch (a?.$case) {
    case "chaosOp": {
      const phase = chaosPhaseName(a.value.phase);
      if (!isChaosAction(phase)) return undefined;
      const v = a.value;
      const op: ChaosOp = defined({
        op: v.op,
        opId: v.opId,
        vm: v.vm,
        setId: record.setId,
        ioasid: record.ioasid,
        generation: record.generation,
        spid: record.spid,
        latencyMs: v.latencyMs,
        error: v.error,
      });
      return { kind: "op", action: phase, op };
    }
    case "chaosFault": {
      const v = a.value;
      const marker: FaultMarker = defined({
        fault: v.fault,
        target: v.target as ChaosTarget,
        faultId: v.faultId,
        link: v.link as ChaosLink | undefined,
        latencyMs: v.latencyMs,
        jitterMs: v.jitterMs,
        probability: v.probability,
        cause: v.cause,
        node: v.node,
        hosts: v.hosts.length === 0 ? undefined : v.hosts,
      });
      return { kind: "fault", marker };
    }
    case "chaosHeal":
      return { kind: "heal", marker: a.value.faultId === undefined ? { heal: true } : { heal: true, faultId: a.value.faultId } };
    case "chaosNote":
      return { kind: "note", note: a.value.note };
    default:
      return undefined;
  }
}

function isChaosAction(action: string): action is ChaosAction {
  return action === "invoke" || action === "ok" || action === "fail" || action === "info";
}

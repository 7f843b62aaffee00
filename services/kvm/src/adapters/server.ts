import { HistoryRecorder, startSubscriber, DEFAULT_PREFIX } from "@ioasid/bus";
import { createGrpcServer, type ServiceHandlers } from "@ioasid/grpc-kit";
import { events, kvm as kvmProto } from "@ioasid/proto";
import { createGrpcCorePort, type CoreClient, type RoleParts, type RoleRuntime } from "@ioasid/role-kit";
import type { NatsConnection } from "@nats-io/transport-node";
import { GpCause } from "../domain/ia32-pasid.js";
import {
  Kvm,
  KVM_SUBSCRIBER,
  KvmEventType,
  type EnqcmdResult,
  type KvmKeptEntry,
  type KvmEvent,
  type NotifierPort,
  type VmSnapshot,
} from "../domain/kvm.js";

const REGISTRATION_STATE = {
  PENDING: kvmProto.RegistrationState.REGISTRATION_STATE_PENDING,
  ACTIVE: kvmProto.RegistrationState.REGISTRATION_STATE_ACTIVE,
} as const;

const GP_CAUSE = {
  [GpCause.PASID_NOT_VALID]: kvmProto.GpCause.GP_CAUSE_PASID_NOT_VALID,
  [GpCause.RESERVED_BITS]: kvmProto.GpCause.GP_CAUSE_RESERVED_BITS,
  [GpCause.NO_TRANSLATION]: kvmProto.GpCause.GP_CAUSE_NO_TRANSLATION,
} as const;

const EVENT_TYPE: ReadonlyMap<events.EventType, KvmEventType> = new Map([
  [events.EventType.EVENT_TYPE_BIND, KvmEventType.BIND],
  [events.EventType.EVENT_TYPE_UNBIND, KvmEventType.UNBIND],
  [events.EventType.EVENT_TYPE_FREE, KvmEventType.FREE],
]);

/** The events KVM registers for (ioasid.rst "KVM PASID Translation Table Updates": BIND/UNBIND, FREE). */
export const KVM_EVENTS: readonly events.EventType[] = [...EVENT_TYPE.keys()];

/** A bus event as the KVM domain sees it. */
export function toKvmEvent(e: events.IoasidEvent): KvmEvent {
  return { seq: e.seq, type: EVENT_TYPE.get(e.type) ?? KvmEventType.OTHER, ioasid: e.ioasid, generation: e.generation, spid: e.spid, setId: e.setId };
}

/** A VM snapshot on the wire. */
export function toVm(s: VmSnapshot): kvmProto.Vm {
  return kvmProto.Vm.fromPartial({
    vmId: s.vmId,
    mmToken: s.mmToken,
    vmName: s.vmName,
    vcpuCount: s.vcpuCount,
    registration: REGISTRATION_STATE[s.registration],
    setId: s.setId,
    translations: s.translations.map((t) => ({
      gpasid: t.gpasid,
      hpasid: t.hpasid,
      generation: t.generation,
      bindEventSeq: t.bindSeq,
      installedAt: t.installedAt,
    })),
    referencesHeld: s.referencesHeld,
    createdAt: s.createdAt,
  });
}

/** An ENQCMD outcome on the wire. */
export function toEnqcmdResponse(r: EnqcmdResult): kvmProto.EnqcmdResponse {
  return r.outcome === "TRANSLATED"
    ? kvmProto.EnqcmdResponse.fromPartial({
        outcome: kvmProto.EnqcmdOutcome.ENQCMD_OUTCOME_TRANSLATED,
        gpasid: r.gpasid,
        hpasid: r.hpasid,
        generation: r.generation,
      })
    : kvmProto.EnqcmdResponse.fromPartial({ outcome: kvmProto.EnqcmdOutcome.ENQCMD_OUTCOME_GP, gpasid: r.gpasid, gpCause: GP_CAUSE[r.cause] });
}

/**
 * The KvmService handlers: translate the wire request, delegate to {@link Kvm}, translate the
 * answer. Refusals are the domain's DomainErrors (grpc-kit maps them to status + reason).
 */
export function createKvmHandlers(host: Kvm): ServiceHandlers<typeof kvmProto.KvmServiceService> {
  return {
    createVm: async (req) => ({ vm: toVm(await host.createVm({ mmToken: req.mmToken, vcpuCount: req.vcpuCount, vmName: req.vmName })) }),
    destroyVm: async (req) => host.destroyVm(req.vmId),
    enqcmd: (req) => toEnqcmdResponse(host.enqcmd(req.vmId, req.vcpu, req.ia32Pasid)),
    queryState: async (req) => ({ vms: (await host.queryState(req.vmId)).map(toVm), takenAt: new Date() }),
  };
}

/** One NATS subscription per VM instance (subscriber `kvm/<instance>`) through the bus SDK. */
export function createNotifierPort(nc: NatsConnection, prefix: string = DEFAULT_PREFIX): NotifierPort {
  return {
    subscribe: async (instance, handler) => {
      const sub = await startSubscriber({ nc, name: KVM_SUBSCRIBER, instance, prefix, handler: (e, ctx) => handler(toKvmEvent(e), ctx.attempt) });
      return { stop: () => sub.stop() };
    },
  };
}

/** Options of {@link buildKvmRole}. */
export interface KvmRoleOptions {
  readonly core: CoreClient;
  /** @default "127.0.0.1" */
  readonly host?: string;
  /** @default 0 (ephemeral) */
  readonly port?: number;
  /** Drop what an earlier KVM process left (see {@link KvmOptions.reapStale}). @default true */
  readonly reapStale?: boolean;
  /** Period of the retries (reconciliation at start, deferred reference drops), ms. @default 1000 */
  readonly retryMs?: number;
}

/** Attempts of the start-up reconciliation before giving up (≈ 10 minutes at the default period). */
const MAX_RECONCILE_ATTEMPTS = 600;

/**
 * KVM as a role for `runRole`: its VMs and VMCS tables restored from what it kept, reconciled with
 * the core (what an earlier KVM process left) — in the background: it serves KvmService at once,
 * and CreateVm waits for the reconciliation — with the deferred reference drops retried on a timer,
 * and every VM destroyed when it stops (their references dropped, registrations withdrawn:
 * ioasid.rst rule 4). Each VM subscribes for itself (per MM token), so the role has no subscriber
 * of its own.
 *
 * @example
 * await runRole({ role: KVM_SUBSCRIBER, instance: "kvm0", config, build: (rt) => buildKvmRole(rt, { core }) });
 */
export function buildKvmRole(rt: RoleRuntime<KvmKeptEntry>, options: KvmRoleOptions): RoleParts {
  const server = createGrpcServer({ service: "kvm", logger: rt.logger });
  const logger = server.logger;
  const retryMs = options.retryMs ?? 1000;
  const host = new Kvm({
    store: rt.store,
    saved: rt.saved,
    core: createGrpcCorePort(options.core),
    notifier: createNotifierPort(rt.nc, rt.prefix),
    // KVM writes each table change in the turn it records it, so its history gate needs no quiet test.
    history: (instance) => rt.history(new HistoryRecorder(rt.nc, KVM_SUBSCRIBER, instance, rt.prefix)),
    log: (level, msg, fields) => logger[level](fields ?? {}, msg),
    ...(options.reapStale === undefined ? {} : { reapStale: options.reapStale }),
  });
  server.addService(kvmProto.KvmServiceService, createKvmHandlers(host));
  return {
    server,
    listen: { host: options.host ?? "127.0.0.1", port: options.port ?? 0 },
    restored: { message: "restored the VMs and their VMCS tables", fields: () => ({ keys: rt.saved.size }) },
    reconcile: { run: () => host.reconcile(), when: "in-background", retryOn: () => true, retryMs, maxAttempts: MAX_RECONCILE_ATTEMPTS },
    retry: { due: () => host.releaseWorkDue, run: () => host.retryPendingReleases(), everyMs: retryMs },
    stop: async () => {
      await host.destroyAll();
      options.core.close();
    },
  };
}

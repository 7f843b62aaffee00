import { failStopOnWriteError, HistoryGate, HistoryRecorder, RoleState, startSubscriber, DEFAULT_PREFIX } from "@ioasid/bus";
import { isDomainError } from "@ioasid/errors";
import { createGrpcServer, formatAddress, type GrpcServer, type ServiceHandlers } from "@ioasid/grpc-kit";
import { core, events, kvm as kvmProto } from "@ioasid/proto";
import { ensureRegistration, type CoreClient } from "@ioasid/role-kit";
import type { NatsConnection } from "@nats-io/transport-node";
import { GpCause } from "./ia32-pasid.js";
import {
  Kvm,
  KVM_SUBSCRIBER,
  KvmEventType,
  type EnqcmdResult,
  type HolderReference,
  type KvmCorePort,
  type KvmEvent,
  type NotifierPort,
  type RegistrationStatus,
  type VmSnapshot,
} from "./kvm.js";
import { kvmStateCodec } from "./kvm-state-codec.js";

type Logger = GrpcServer["logger"];

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

function toRegistrationStatus(r: core.Registration): RegistrationStatus {
  return { registrationId: r.registrationId, instance: r.subscriber?.instance ?? "", active: r.active, setId: r.activeSetId };
}

function toHolder(ref: HolderReference): core.Holder {
  return { role: KVM_SUBSCRIBER, instance: ref.instance, purpose: ref.purpose };
}

/**
 * KVM's view of ioasid-core through a CoreService client: registration by MM token at CPU
 * priority, and ioasid_get()/ioasid_put() for holder `kvm/<instance>/<purpose>`.
 */
export function createCorePort(client: CoreClient): KvmCorePort {
  return {
    register: async (instance, mmToken) =>
      toRegistrationStatus(
        await ensureRegistration(client, {
          subscriber: { name: KVM_SUBSCRIBER, instance },
          priority: events.Priority.PRIORITY_CPU,
          scope: { $case: "mmToken", value: mmToken },
          events: KVM_EVENTS,
        }),
      ),
    unregister: async (registrationId) => {
      await client.unregister({ registrationId });
    },
    registrations: async () =>
      (await client.listRegistrations({})).registrations.filter((r) => r.subscriber?.name === KVM_SUBSCRIBER).map(toRegistrationStatus),
    get: async (ref) =>
      (await client.get(core.GetRequest.fromPartial({ setId: ref.setId, ioasid: ref.ioasid, holder: toHolder(ref), generation: ref.generation }))).refcount,
    put: async (ref) => {
      await client.put(core.PutRequest.fromPartial({ setId: ref.setId, ioasid: ref.ioasid, holder: toHolder(ref), generation: ref.generation }));
    },
    holds: async (ref) => {
      try {
        const info = (await client.describe({ ioasid: ref.ioasid })).info;
        return (
          info !== undefined &&
          info.generation === ref.generation &&
          info.holders.some((h) => h.holder?.role === KVM_SUBSCRIBER && h.holder.instance === ref.instance && h.holder.purpose === ref.purpose)
        );
      } catch (err) {
        if (isDomainError(err, "IOASID_NOT_FOUND")) return false;
        throw err;
      }
    },
    orphanReferences: async (live) => {
      const refs: HolderReference[] = [];
      for (const set of (await client.listSets({})).sets) {
        let ioasids: core.IoasidInfo[];
        try {
          ioasids = (await client.listIoasids({ setId: set.setId })).ioasids;
        } catch (err) {
          if (isDomainError(err, "SET_UNKNOWN")) continue;
          throw err;
        }
        for (const info of ioasids) {
          for (const h of info.holders) {
            if (h.holder?.role !== KVM_SUBSCRIBER || live.has(h.holder.instance)) continue;
            for (let i = 0; i < h.count; i++) refs.push({ setId: set.setId, ioasid: info.ioasid, generation: info.generation, instance: h.holder.instance, purpose: h.holder.purpose });
          }
        }
      }
      return refs;
    },
    heldReferences: async (setId, instance) => {
      let ioasids: core.IoasidInfo[];
      try {
        ioasids = (await client.listIoasids({ setId })).ioasids;
      } catch (err) {
        if (isDomainError(err, "SET_UNKNOWN")) return [];
        throw err;
      }
      const refs: HolderReference[] = [];
      for (const info of ioasids) {
        for (const h of info.holders) {
          if (h.holder?.role !== KVM_SUBSCRIBER || h.holder.instance !== instance) continue;
          for (let i = 0; i < h.count; i++) refs.push({ setId, ioasid: info.ioasid, generation: info.generation, instance, purpose: h.holder.purpose });
        }
      }
      return refs;
    },
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

/** Options of {@link startKvmServer}. */
export interface StartKvmServerOptions {
  readonly nc: NatsConnection;
  readonly core: CoreClient;
  /** @default "127.0.0.1" */
  readonly host?: string;
  /** @default 0 (ephemeral) */
  readonly port?: number;
  /** Bus subject prefix. @default "ioasid.v1" */
  readonly prefix?: string;
  readonly logger?: Logger;
  /** Drop what an earlier KVM process left (see {@link KvmOptions.reapStale}). @default true */
  readonly reapStale?: boolean;
  /** Period of the retries (reconciliation at start, deferred reference drops), ms. @default 1000 */
  readonly retryMs?: number;
  /** Name of this KVM's kept state (its VMs and tables) in JetStream. @default "kvm0" */
  readonly instance?: string;
}

/** A running KVM service. */
export interface RunningKvm {
  readonly server: GrpcServer;
  readonly kvm: Kvm;
  /** `host:port` clients connect to. */
  readonly address: string;
  /**
   * Stops the background retries and destroys every VM (their references dropped, registrations
   * withdrawn). Call after the gRPC server has stopped.
   */
  stop(): Promise<void>;
}

/** Attempts of the start-up reconciliation before giving up (≈ 10 minutes at the default period). */
const MAX_RECONCILE_ATTEMPTS = 600;

/**
 * Starts KVM: reconciles with the core (what an earlier KVM process left), then serves KvmService
 * (+ health, reflection). If the core is not reachable yet, it listens anyway and keeps trying in
 * the background; CreateVm waits for the reconciliation.
 *
 * @example
 * const running = await startKvmServer({ nc, core: createCoreClient(address), port: 0 });
 */
export async function startKvmServer(options: StartKvmServerOptions): Promise<RunningKvm> {
  const server = createGrpcServer({ service: "kvm", ...(options.logger === undefined ? {} : { logger: options.logger }) });
  const logger = server.logger;
  const prefix = options.prefix ?? DEFAULT_PREFIX;
  const retryMs = options.retryMs ?? 1000;
  // The VMs and their VMCS tables live in JetStream: a KVM killed with -9 comes back with them.
  const store = await RoleState.open(options.nc, { role: KVM_SUBSCRIBER, instance: options.instance ?? "kvm0", prefix, codec: kvmStateCodec });
  // A store in another format (the JSON of earlier versions) is refused here, with what to do.
  const saved = await store.load();
  // Set once stop() begins: a store write failing while the VMs are destroyed does not fail-stop.
  let stopping = false;
  if (saved.size > 0) logger.info({ keys: saved.size }, "restored the VMs and their VMCS tables");
  // History records wait until the tables they describe are kept (a crash takes back both); KVM
  // writes each table change in the turn it records it.
  const gate = new HistoryGate();
  const host = new Kvm({
    store: gate.store(failStopOnWriteError(store, (err: unknown) => {
      logger.fatal({ err: String(err) }, "state store unwritable: exiting so a restart restores the kept VMs and reconciles");
      process.exit(1);
    }, { stopping: () => stopping })),
    saved,
    core: createCorePort(options.core),
    notifier: createNotifierPort(options.nc, prefix),
    history: (instance) => gate.wrap(new HistoryRecorder(options.nc, KVM_SUBSCRIBER, instance, prefix)),
    log: (level, msg, fields) => logger[level](fields ?? {}, msg),
    ...(options.reapStale === undefined ? {} : { reapStale: options.reapStale }),
  });
  server.addService(kvmProto.KvmServiceService, createKvmHandlers(host));

  let reconcileTimer: NodeJS.Timeout | undefined;
  let attempts = 0;
  const reconcile = async (): Promise<void> => {
    attempts++;
    try {
      await host.reconcile();
    } catch (err) {
      if (attempts === 1) logger.warn({ err: String(err) }, "cannot reconcile with ioasid-core yet; retrying in the background");
      if (attempts >= MAX_RECONCILE_ATTEMPTS) {
        logger.error({ attempts }, "giving up reconciling with ioasid-core; CreateVm will try again");
        return;
      }
      reconcileTimer = setTimeout(() => void reconcile(), retryMs);
      reconcileTimer.unref();
    }
  };
  await reconcile();
  let retrying = false;
  const releaseTimer = setInterval(() => {
    if (retrying || !host.releaseWorkDue) return;
    retrying = true;
    void host.retryPendingReleases().finally(() => {
      retrying = false;
    });
  }, retryMs);
  releaseTimer.unref();

  const listenHost = options.host ?? "127.0.0.1";
  const port = await server.listen(listenHost, options.port ?? 0);
  return {
    server,
    kvm: host,
    address: formatAddress(listenHost, port),
    async stop() {
      stopping = true;
      clearTimeout(reconcileTimer);
      clearInterval(releaseTimer);
      await host.destroyAll();
      await gate.settle();
    },
  };
}

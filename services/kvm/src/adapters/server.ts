import { HistoryRecorder } from "@ioasid/bus";
import { createGrpcServer, type GrpcServerOptions, type ServiceHandlers } from "@ioasid/grpc-kit";
import { kvm as kvmProto } from "@ioasid/proto";
import { createGrpcCorePort, type CoreClient, type RoleParts, type RoleRuntime } from "@ioasid/role-kit";
import { KVM_SUBSCRIBER } from "../domain/holder-reference.js";
import type { NotifierPort } from "../domain/kvm-event.js";
import type { KvmKeptEntry } from "../domain/kvm-kept-entry.js";
import { Kvm } from "../domain/kvm.js";
import { toEnqcmdResponse, toHistorySink, toVm } from "./convert.js";
import { createNotifierPort } from "./notifier-port.js";

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

/** Options of {@link buildKvmRole}. */
export interface KvmRoleOptions {
  /** The KVM instance's credentials: KvmService requires mTLS (DESIGN §11). @default plaintext */
  readonly tls?: GrpcServerOptions["tls"];
  readonly core: CoreClient;
  /** @default "127.0.0.1" */
  readonly host?: string;
  /** @default 0 (ephemeral) */
  readonly port?: number;
  /** Drop what an earlier KVM process left (see {@link KvmOptions.reapStale}). @default true */
  readonly reapStale?: boolean;
  /** Where VM notifiers subscribe. @default one bus subscriber per VM ({@link createNotifierPort}) */
  readonly notifier?: NotifierPort;
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
  // VMMs reach only VFIO (DESIGN §11).
  const server = createGrpcServer({ service: "kvm", logger: rt.logger, ...(options.tls === undefined ? {} : { tls: options.tls, refuseRoles: ["vmm"] }) });
  const logger = server.logger;
  const retryMs = options.retryMs ?? 1000;
  const host = new Kvm({
    store: rt.store,
    saved: rt.saved,
    core: createGrpcCorePort(options.core),
    notifier: options.notifier ?? createNotifierPort(rt.nc, rt.prefix, rt.observeHandler),
    // KVM writes each table change in the turn it records it, so its history gate needs no quiet test.
    history: (instance) => toHistorySink(rt.history(new HistoryRecorder(rt.nc, KVM_SUBSCRIBER, instance, rt.prefix))),
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

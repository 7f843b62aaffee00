import { HistoryRecorder } from "@ioasid/bus";
import { createGrpcCorePort, type CoreClient, type CorePort, type RoleParts, type RoleRuntime } from "@ioasid/role-kit";
import { Vdcm, VDCM_ROLE } from "../domain/vdcm.js";
import { VdcmState } from "../domain/vdcm-state.js";
import type { VdcmKeptEntry } from "../domain/vdcm-kept-entry.js";
import { toHistorySink, toVdcmEvent } from "./convert.js";
import { iommuDmaTranslator, type IommuClient } from "./iommu-adapter.js";
import { createVdcmServer, type CreateVdcmServerOptions } from "./server.js";

/** Options of {@link buildVdcmRole}. */
export interface VdcmRoleOptions {
  /** VDCM_INSTANCE: its subscriber instance and the holder instance of its references. */
  readonly instance: string;
  /** Where VdcmService listens. */
  readonly listen: { readonly host: string; readonly port: number };
  /** The core's client (closed when the role stops). */
  readonly coreClient: CoreClient;
  /** The IOMMU's client for descriptors' DMA (closed when the role stops). */
  readonly iommuClient: IommuClient;
  /** The core as VDCM calls it (a test main wraps it). @default createGrpcCorePort(coreClient) */
  readonly core?: CorePort;
  /** The VDCM instance's credentials: VdcmService requires mTLS (DESIGN §11). @default plaintext */
  readonly tls?: CreateVdcmServerOptions["tls"];
}

/**
 * VDCM as a role for `runRole`: the device tables restored from what it kept, reconciled with the
 * core before it serves, one subscriber for every set's FREE deliveries, deferred releases retried.
 *
 * @example
 * await runRole({ role: VDCM_ROLE, instance, config, codec: vdcmStateCodec, build: (rt) => buildVdcmRole(rt, { instance, listen, coreClient, iommuClient }) });
 */
export function buildVdcmRole(rt: RoleRuntime<VdcmKeptEntry>, options: VdcmRoleOptions): RoleParts {
  const { logger, nc, saved, store, history, prefix } = rt;
  // The device tables come back as kept: devices, mdevs and programmed PASIDs (the hardware did
  // not forget them); reconcile then squares them with the core.
  const state = VdcmState.restore(saved);
  const vdcm = new Vdcm({
    state,
    store,
    instance: options.instance,
    core: options.core ?? createGrpcCorePort(options.coreClient),
    dma: iommuDmaTranslator(options.iommuClient),
    history: toHistorySink(history(new HistoryRecorder(nc, VDCM_ROLE, options.instance, prefix))),
    log: (level, msg, fields) => logger[level](fields ?? {}, msg),
  });
  return {
    server: createVdcmServer(vdcm, { logger, ...(options.tls === undefined ? {} : { tls: options.tls }) }),
    listen: options.listen,
    quiet: () => !state.hasChanges(),
    restored: {
      message: "restored the device tables",
      fields: () => {
        const snap = vdcm.snapshot();
        return { devices: snap.devices.length, mdevs: snap.mdevs.length, entries: snap.devices.reduce((n, d) => n + d.pasidEntries.length, 0) };
      },
    },
    // References and registrations the restored tables do not back are stale; entries whose
    // reference is gone are cleared. Any failure is retried while NATS's connect timeout lasts
    // (the core may start after VDCM).
    reconcile: { run: () => vdcm.reconcile(), when: "before-serving", retryOn: () => true },
    // One subscriber per process: deliveries of every set registration (DEVICE priority) arrive here.
    subscriber: {
      instance: options.instance,
      handler: (e) => vdcm.onIoasidEvent(toVdcmEvent(e)),
    },
    // Releases deferred while the core was unreachable are retried until made.
    retry: { due: () => vdcm.pendingPutCount > 0, run: () => vdcm.retryPendingPuts(), everyMs: 1000 },
    stop: () => {
      options.coreClient.close();
      options.iommuClient.close();
    },
  };
}

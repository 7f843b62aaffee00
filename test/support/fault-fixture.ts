import { isDomainError } from "@ioasid/errors";
import { iommu, vfio } from "@ioasid/proto";
import { waitFor } from "@ioasid/testkit";
import type { StackClients } from "@ioasid/cli";

// Helpers of the IO page fault tests: a guest (container, Session, assigned PRI device, bound guest
// PASID, stage 2 mapped), a VMM's WatchFaults stream, and a device's DMA through the IOMMU.

const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);

/**
 * Guest physical memory every test guest's stage 2 maps: GPA [GPA_BASE, +STAGE2_SIZE) → the start of
 * the host memory VFIO gave the guest's container ({@link Guest.hpaBase}).
 */
export const GPA_BASE = 0x1000_0000n;
export const STAGE2_SIZE = 0x100_0000n;
/** Guest virtual addresses the tests fault on. */
export const GVA_BASE = 0x7f00_0000_0000n;
export const PAGE = 0x1000n;

/** One guest: its container, the Session held open by the test (abort = the VMM going away), one bound PASID. */
export interface Guest {
  readonly containerId: number;
  readonly setId: number;
  readonly deviceId: string;
  readonly hpasid: number;
  readonly generation: number;
  readonly gpasid: number;
  readonly stage2: number;
  /** Where its stage 2 maps GPA_BASE: the first host address VFIO gave the container (OpenContainerResponse.guest_memory). */
  readonly hpaBase: bigint;
  /** Ends the Session stream from the VMM's side (the crashed-guest path). */
  readonly session: AbortController;
}

/** Registers a device at the IOMMU (PF, PRI-capable unless said otherwise). */
export async function registerDevice(c: StackClients, deviceId: string, over: { priCapable?: boolean; priCredits?: number } = {}): Promise<void> {
  await c.iommu.registerDevice(
    P(iommu.RegisterDeviceRequest, {
      deviceId,
      maxPasids: 1 << 20,
      priCapable: over.priCapable ?? true,
      priCredits: over.priCredits ?? 0,
      function: iommu.DeviceFunction.DEVICE_FUNCTION_PF,
      iommuGroup: 9,
    }),
  );
}

/**
 * A guest on `deviceId`: container for `token`, Session attached, the device assigned (VFIO
 * attaches the VM's stage 2), the stage 2 mapped, `pasids` PASIDs allocated and bound (gpasid 100+i).
 */
export async function openGuest(c: StackClients, token: bigint, deviceId: string, gpasid = 100): Promise<Guest> {
  const opened = await c.vfio.openContainer(P(vfio.OpenContainerRequest, { mmToken: token, quota: 32, vmName: `guest-${token}` }));
  const session = await attachSession(c, opened.containerId);
  await c.vfio.assignDevice(P(vfio.AssignDeviceRequest, { containerId: opened.containerId, device: { ref: { $case: "deviceId", value: deviceId } } }));
  // The VMM maps guest RAM into its stage 2 (VFIO_IOMMU_MAP_DMA): memory VFIO gave its container.
  const hpaBase = opened.guestMemory[0]!.paddr;
  await c.vfio.mapDma(
    P(vfio.MapDmaRequest, { containerId: opened.containerId, iova: GPA_BASE, paddr: hpaBase, size: STAGE2_SIZE, access: { read: true, write: true } }),
  );
  const state = await c.iommu.queryState(P(iommu.QueryStateRequest, { deviceIds: [deviceId] }));
  const stage2 = state.attachHandles.find((h) => h.withoutPasid)!.domainId;
  const a = await c.vfio.allocPasid({ containerId: opened.containerId });
  await c.vfio.bindGuestPasid(
    P(vfio.BindGuestPasidRequest, {
      containerId: opened.containerId,
      device: { ref: { $case: "deviceId", value: deviceId } },
      hpasid: a.hpasid,
      generation: a.generation,
      gpasid,
      guestPgtable: 0x5000n,
    }),
  );
  return { containerId: opened.containerId, setId: opened.setId, deviceId, hpasid: a.hpasid, generation: a.generation, gpasid, stage2, hpaBase, session };
}

/**
 * The VMM's Session stream of a container, held open by the test; resolves once attached. Aborting
 * the returned controller ends the session from the VMM's side (the crashed-guest path).
 */
export async function attachSession(c: StackClients, containerId: number): Promise<AbortController> {
  const session = new AbortController();
  await new Promise<void>((resolve, reject) => {
    void (async () => {
      try {
        for await (const m of c.vfio.session({ containerId }, { signal: session.signal })) {
          if (m.event?.$case === "attached") resolve();
        }
      } catch (err) {
        reject(err as Error);
      }
    })();
  });
  return session;
}

/** Whether the IOASID was reclaimed (the core no longer knows it). */
export async function isReclaimed(c: StackClients, ioasid: number): Promise<boolean> {
  try {
    await c.core.describe({ ioasid });
    return false;
  } catch (err) {
    if (isDomainError(err, "IOASID_NOT_FOUND")) return true;
    throw err;
  }
}

/** A VMM's WatchFaults stream, collecting what arrives. */
export interface Watch {
  readonly items: vfio.WatchFaultsResponse["item"][];
  readonly groups: () => vfio.FaultGroup[];
  readonly answered: () => vfio.FaultAnswer[];
  readonly faults: () => vfio.FaultRecord[];
  readonly stop: () => void;
  /** Settles when the stream ends (resolves with its error, if any). */
  readonly ended: Promise<unknown>;
}

/** Opens WatchFaults on a container and waits until VFIO reports the watcher attached. */
export async function watchFaults(c: StackClients, containerId: number): Promise<Watch> {
  const ac = new AbortController();
  const items: vfio.WatchFaultsResponse["item"][] = [];
  const ended = (async () => {
    try {
      for await (const m of c.vfio.watchFaults({ containerId }, { signal: ac.signal })) items.push(m.item);
      return undefined;
    } catch (err) {
      return err;
    }
  })();
  await waitFor(async () => (await c.vfio.queryState({ containerId })).containers[0]?.faultWatcherAttached === true, { message: "the watcher attached" });
  const pick = <K extends "group" | "answered" | "fault">(k: K) =>
    items.flatMap((i) => (i?.$case === k ? [i.value as Extract<NonNullable<vfio.WatchFaultsResponse["item"]>, { $case: K }>["value"]] : []));
  return {
    items,
    groups: () => pick("group"),
    answered: () => pick("answered"),
    faults: () => pick("fault"),
    stop: () => ac.abort(),
    ended,
  };
}

/** One DMA translation request of a device (read access unless `write`). */
export function dma(
  c: StackClients,
  deviceId: string,
  pasid: number,
  address: bigint,
  options: { write?: boolean; prgi?: number; last?: boolean } = {},
): Promise<iommu.TranslateResponse> {
  return c.iommu.translate(
    P(iommu.TranslateRequest, {
      deviceId,
      pasid,
      address,
      access: { read: options.write !== true, write: options.write === true },
      ...(options.prgi === undefined ? {} : { pageRequestGroup: { prgi: options.prgi, lastRequest: options.last ?? true } }),
    }),
  );
}

/** The guest's fault handler: installs each requested page (GVA page → GPA_BASE + offset) and answers. */
export async function guestAnswers(c: StackClients, g: Guest, group: vfio.FaultGroup, code = vfio.PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS): Promise<void> {
  if (code === vfio.PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS) {
    for (const r of group.requests) {
      await c.vfio.mapGuestPages(
        P(vfio.MapGuestPagesRequest, {
          containerId: g.containerId,
          hpasid: g.hpasid,
          iova: r.address,
          gpa: gpaOf(r.address),
          size: PAGE,
          access: { read: true, write: true },
        }),
      );
    }
  }
  await c.vfio.sendPageResponse({ containerId: g.containerId, faultGroupId: group.faultGroupId, code });
}

/** The GPA a test guest maps a GVA page to. */
export function gpaOf(gva: bigint): bigint {
  return GPA_BASE + ((gva - GVA_BASE) % STAGE2_SIZE);
}

export const OUTCOME = iommu.TranslateOutcome;
export const CODE = iommu.PageResponseCode;
export const SOURCE = iommu.PageResponseSource;

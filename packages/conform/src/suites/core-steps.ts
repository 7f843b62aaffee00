import { isDomainError } from "@ioasid/errors";
import { core, events } from "@ioasid/proto";
import type { Harness } from "../harness.js";

/**
 * The core-side steps the kit takes itself while it plays the roles around the target (VFIO
 * creating a VM's set and allocating for the guest, the IOMMU driver attaching the SPID — which
 * emits BIND — and so on), as plain CoreService calls.
 */

/** VFIO opening a container: the VM's IOASID set with its MM token. */
export async function createMmSet(h: Harness, token: bigint, quota = 16): Promise<number> {
  return (await h.core.createSet(core.CreateSetRequest.fromPartial({ tokenType: events.TokenType.TOKEN_TYPE_MM, token, quota }))).set!.setId;
}

/** An IOASID allocated in `setId`. */
export async function alloc(h: Harness, setId: number): Promise<{ ioasid: number; generation: number }> {
  const a = await h.core.alloc(core.AllocRequest.fromPartial({ setId }));
  return { ioasid: a.ioasid, generation: a.generation };
}

/** An IOASID allocated and its SPID attached (the IOMMU driver's bind_gpasid: BIND is emitted). */
export async function allocBound(h: Harness, setId: number, spid: number): Promise<{ ioasid: number; generation: number }> {
  const a = await alloc(h, setId);
  await h.core.attachSpid(core.AttachSpidRequest.fromPartial({ setId, ioasid: a.ioasid, spid, generation: a.generation }));
  return a;
}

/** The guest's free (FREE is emitted when someone else still holds a reference). */
export async function free(h: Harness, setId: number, ioasid: number, generation: number): Promise<void> {
  await h.core.free(core.FreeRequest.fromPartial({ setId, ioasid, generation }));
}

/** The SPID detached (UNBIND is emitted unless the IOASID is FREE_PENDING). */
export async function detachSpid(h: Harness, setId: number, ioasid: number, generation: number): Promise<void> {
  await h.core.detachSpid(core.DetachSpidRequest.fromPartial({ setId, ioasid, generation }));
}

/** One IOASID's holders as `role/instance/purpose×count`, or undefined once it is reclaimed. */
export async function holdersOf(h: Harness, ioasid: number): Promise<string[] | undefined> {
  try {
    const info = (await h.core.describe({ ioasid })).info!;
    return info.holders.map((x) => `${x.holder!.role}/${x.holder!.instance}/${x.holder!.purpose}×${x.count}`);
  } catch (err) {
    if (isDomainError(err, "IOASID_NOT_FOUND")) return undefined;
    throw err;
  }
}

/** How many references holders of `role` have on `ioasid` (0 once it is reclaimed). */
export async function referencesOf(h: Harness, ioasid: number, role: string): Promise<number> {
  try {
    const info = (await h.core.describe({ ioasid })).info!;
    return info.holders.filter((x) => x.holder!.role === role).reduce((n, x) => n + x.count, 0);
  } catch (err) {
    if (isDomainError(err, "IOASID_NOT_FOUND")) return 0;
    throw err;
  }
}

/** The IOASID's state and generation, or undefined once it is reclaimed. */
export async function stateOf(h: Harness, ioasid: number): Promise<{ state: core.IoasidState; generation: number } | undefined> {
  try {
    const info = (await h.core.describe({ ioasid })).info!;
    return { state: info.state, generation: info.generation };
  } catch (err) {
    if (isDomainError(err, "IOASID_NOT_FOUND")) return undefined;
    throw err;
  }
}

/** A delivery of `type` for `ioasid`. */
export function deliveryOf(type: events.EventType, ioasid: number): (d: { event?: events.IoasidEvent | undefined }) => boolean {
  return (d) => d.event?.type === type && d.event.ioasid === ioasid;
}

/** An event of `type` for `ioasid`. */
export function eventOf(type: events.EventType, ioasid: number): (e: events.IoasidEvent) => boolean {
  return (e) => e.type === type && e.ioasid === ioasid;
}

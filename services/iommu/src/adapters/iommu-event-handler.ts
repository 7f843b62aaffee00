import type { EventHandler } from "@ioasid/bus";
import type { events } from "@ioasid/proto";
import { eventTypeFromWire } from "@ioasid/role-kit";
import type { IommuDriver, IommuEvent } from "../domain/iommu-driver.js";

/**
 * A delivered event in the domain's words, or undefined for an event type this build does not
 * know (the IOMMU handles FREE only: an unknown type is one it has nothing for).
 */
export function toIommuEvent(e: events.IoasidEvent): IommuEvent | undefined {
  const type = eventTypeFromWire(e.type);
  if (type === undefined) return undefined;
  return { seq: Number(e.seq), type, ioasid: e.ioasid, generation: e.generation, spid: e.spid, setId: e.setId };
}

/** The IOMMU's bus handler: each delivery converted, then handed to {@link IommuDriver.handleEvent}. */
export function createIommuEventHandler(driver: Pick<IommuDriver, "handleEvent">): EventHandler {
  return (event) => {
    const e = toIommuEvent(event);
    return e === undefined ? undefined : driver.handleEvent(e);
  };
}

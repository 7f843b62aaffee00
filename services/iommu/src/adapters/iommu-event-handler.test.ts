import { describe, expect, it } from "vitest";
import { EventType } from "@ioasid/ioasid";
import { events } from "@ioasid/proto";
import type { IommuEvent } from "../domain/iommu-driver.js";
import { createIommuEventHandler, toIommuEvent } from "./iommu-event-handler.js";
import { toHistoryAction } from "./iommu-history.js";

const FREE = events.IoasidEvent.fromPartial({ seq: 42n, type: events.EventType.EVENT_TYPE_FREE, ioasid: 201, generation: 3, spid: 9, setId: 5 });

describe("the IOMMU's bus handler", () => {
  it("hands the driver a delivered event in the domain's words", () => {
    expect(toIommuEvent(FREE)).toEqual({ seq: 42, type: EventType.FREE, ioasid: 201, generation: 3, spid: 9, setId: 5 });
    const seen: IommuEvent[] = [];
    const handler = createIommuEventHandler({ handleEvent: (e) => (seen.push(e), { release: ["bind"], detachSpid: false }) });
    expect(handler(FREE, {} as never)).toEqual({ release: ["bind"], detachSpid: false });
    expect(seen).toEqual([toIommuEvent(FREE)]);
  });

  it("leaves an event type this build does not know unhandled, without calling the driver", () => {
    const unknown = { ...FREE, type: events.EventType.EVENT_TYPE_UNSPECIFIED };
    expect(toIommuEvent(unknown)).toBeUndefined();
    const handler = createIommuEventHandler({
      handleEvent: () => {
        throw new Error("not called");
      },
    });
    expect(handler(unknown, {} as never)).toBeUndefined();
  });
});

describe("the IOMMU's history adapter", () => {
  it("writes the notifier handler's event type on the wire", () => {
    expect(
      toHistoryAction({ $case: "iommuNbHandler", value: { type: EventType.FREE, tornDown: 2, drainedFaultGroups: 1, bindReferenceReleased: true } }),
    ).toEqual({
      $case: "iommuNbHandler",
      value: { type: events.EventType.EVENT_TYPE_FREE, tornDown: 2, drainedFaultGroups: 1, bindReferenceReleased: true },
    });
  });

  it("passes every other action through unchanged", () => {
    const a = { $case: "bindDropped", value: {} } as const;
    expect(toHistoryAction(a)).toBe(a);
  });
});

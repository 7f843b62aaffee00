import type { HistoryActionInput, HistoryFields } from "@ioasid/bus";
import { eventTypeToWire } from "@ioasid/role-kit";
import type { IommuHistoryAction, IommuHistoryPort } from "../domain/iommu-driver.js";

/** Where the catalogue's history records go (a bus `HistoryRecorder` is one). */
export interface HistorySink {
  record(action: HistoryActionInput, fields?: HistoryFields): void;
}

/** The IOMMU's step in the catalogue's words: the notifier handler's domain event type on the wire. */
export function toHistoryAction(action: IommuHistoryAction): HistoryActionInput {
  if (action.$case !== "iommuNbHandler") return action;
  return { $case: "iommuNbHandler", value: { ...action.value, type: eventTypeToWire(action.value.type) } };
}

/** The driver's history port over a sink of catalogue records (DESIGN §2: the adapters translate). */
export function iommuHistoryPort(sink: HistorySink): IommuHistoryPort {
  return { record: (action, fields) => sink.record(toHistoryAction(action), fields) };
}

import { protoStateCodec, requireField, type StateCodec } from "@ioasid/bus";
import { vdcmState } from "@ioasid/proto";
import { WQ_MODE_FROM_WIRE, WQ_MODE_TO_WIRE } from "./convert.js";
import type { VdcmKeptEntry } from "../domain/vdcm-kept-entry.js";

// VDCM's kept entries ↔ ioasid.vdcm.v1.VdcmStateEntry (vdcm_state.proto): the one place that knows
// both the kept tables and the generated state messages, so vdcm-state.ts stays free of proto types.

/** The proto message every message of VDCM's store holds (its format marker). */
export const VDCM_STATE_FORMAT = `${vdcmState.protobufPackage}.VdcmStateEntry`;

/** A kept entry as its state message. */
export function toVdcmStateEntry(e: VdcmKeptEntry): vdcmState.VdcmStateEntry {
  switch (e.kind) {
    case "device":
      return {
        entry: {
          $case: "device",
          value: {
            deviceId: e.deviceId,
            maxPasidEntries: e.maxPasidEntries,
            wqs: e.wqs.map((w) => ({ wqId: w.wqId, mode: WQ_MODE_TO_WIRE[w.mode], size: w.size })),
          },
        },
      };
    case "mdev":
      return {
        entry: {
          $case: "mdev",
          value: {
            mdevUuid: e.mdevUuid,
            parentDeviceId: e.parentDeviceId,
            wqIds: [...e.wqIds],
            setId: e.setId,
            createdAt: e.createdAt,
            assignedAt: e.assignedAt,
          },
        },
      };
    case "pasidEntry":
      return {
        entry: {
          $case: "pasidEntry",
          value: {
            deviceId: e.deviceId,
            wqId: e.wqId,
            hpasid: e.hpasid,
            generation: e.generation,
            gpasid: e.gpasid,
            setId: e.setId,
            mdevUuid: e.mdevUuid,
            programmedAt: e.programmedAt,
          },
        },
      };
    case "registration":
      return { entry: { $case: "registration", value: { setId: e.setId, registrationId: e.registrationId } } };
  }
}

/**
 * A state message as the kept entry it holds.
 * @throws Error when its kind, a work queue's mode or a required time is missing (the store refuses it at start)
 */
export function fromVdcmStateEntry(m: vdcmState.VdcmStateEntry): VdcmKeptEntry {
  const entry = requireField(m.entry, "VdcmStateEntry.entry");
  switch (entry.$case) {
    case "device": {
      const d = entry.value;
      return {
        kind: "device",
        deviceId: d.deviceId,
        maxPasidEntries: d.maxPasidEntries,
        wqs: d.wqs.map((w) => ({ wqId: w.wqId, mode: requireField(WQ_MODE_FROM_WIRE.get(w.mode), "KeptWorkQueue.mode"), size: w.size })),
      };
    }
    case "mdev": {
      const v = entry.value;
      return {
        kind: "mdev",
        mdevUuid: v.mdevUuid,
        parentDeviceId: v.parentDeviceId,
        wqIds: [...v.wqIds],
        setId: v.setId,
        createdAt: requireField(v.createdAt, "KeptMdev.created_at"),
        assignedAt: v.assignedAt,
      };
    }
    case "pasidEntry": {
      const v = entry.value;
      return {
        kind: "pasidEntry",
        deviceId: v.deviceId,
        wqId: v.wqId,
        hpasid: v.hpasid,
        generation: v.generation,
        gpasid: v.gpasid,
        setId: v.setId,
        mdevUuid: v.mdevUuid,
        programmedAt: requireField(v.programmedAt, "KeptDevicePasidEntry.programmed_at"),
      };
    }
    case "registration":
      return { kind: "registration", setId: entry.value.setId, registrationId: entry.value.registrationId };
  }
}

/** VDCM's kept entries as ioasid.vdcm.v1.VdcmStateEntry bytes (its RoleState and MemoryRoleState). */
export const vdcmStateCodec: StateCodec<VdcmKeptEntry> = protoStateCodec(VDCM_STATE_FORMAT, vdcmState.VdcmStateEntry, toVdcmStateEntry, fromVdcmStateEntry);

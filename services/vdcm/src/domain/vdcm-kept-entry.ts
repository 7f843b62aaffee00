import type { WqMode } from "./vdcm-model.js";

/** A physical device as VDCM keeps it in its store: `dev/<deviceId>`. */
export interface KeptDevice {
  readonly kind: "device";
  readonly deviceId: string;
  readonly maxPasidEntries: number;
  readonly wqs: readonly { readonly wqId: number; readonly mode: WqMode; readonly size: number }[];
}

/** An mdev as VDCM keeps it: `mdev/<uuid>`. */
export interface KeptMdev {
  readonly kind: "mdev";
  readonly mdevUuid: string;
  readonly parentDeviceId: string;
  readonly wqIds: readonly number[];
  /** 0 = unassigned. */
  readonly setId: number;
  readonly createdAt: Date;
  readonly assignedAt: Date | undefined;
}

/** A programmed device PASID entry as VDCM keeps it (PROGRAMMED): `entry/<deviceId>/<wqId>`. */
export interface KeptPasidEntry {
  readonly kind: "pasidEntry";
  readonly deviceId: string;
  readonly wqId: number;
  readonly hpasid: number;
  readonly generation: number;
  readonly gpasid: number;
  readonly setId: number;
  readonly mdevUuid: string;
  readonly programmedAt: Date;
}

/** VDCM's notifier registration on a set, as kept: `reg/<setId>`. */
export interface KeptRegistration {
  readonly kind: "registration";
  readonly setId: number;
  readonly registrationId: number;
}

/** One entry of VDCM's kept state (ioasid.vdcm.v1.VdcmStateEntry; vdcm-state-codec.ts converts). */
export type VdcmKeptEntry = KeptDevice | KeptMdev | KeptPasidEntry | KeptRegistration;

// Store keys of the kept entries.
/** `dev/<deviceId>` */
export const deviceKey = (deviceId: string) => `dev/${deviceId}`;
/** `mdev/<uuid>` */
export const mdevKey = (uuid: string) => `mdev/${uuid}`;
/** `entry/<deviceId>/<wqId>` */
export const entryKey = (deviceId: string, wqId: number) => `entry/${deviceId}/${wqId}`;
/** `reg/<setId>` */
export const regKey = (setId: number) => `reg/${setId}`;

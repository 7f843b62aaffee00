import type { Completion, Descriptor } from "./descriptor-runner.js";

/** Which namespace a shared-work-queue descriptor's PASID is in. */
export const PasidSpace = {
  /** A guest PASID as the guest wrote it: translated through the mdev's set (find-by-SPID). */
  GUEST: "GUEST",
  /** A host PASID the CPU already put in the descriptor (ENQCMD translated by KVM). */
  HOST: "HOST",
} as const;
export type PasidSpace = (typeof PasidSpace)[keyof typeof PasidSpace];

/** A descriptor submission (SubmitDescriptor). */
export interface Submission {
  readonly mdevUuid: string;
  readonly virtualWq: number;
  /** Shared work queue: the descriptor's PASID; 0 on a dedicated one. */
  readonly pasid: number;
  /** Shared work queue: the namespace of `pasid`; undefined = not given. */
  readonly pasidSpace: PasidSpace | undefined;
  /** PASID_SPACE_HOST: expected generation; 0 = unchecked. */
  readonly generation: number;
  readonly descriptor: Descriptor | undefined;
}

/** A descriptor's completion record with the host PASID it ran with. */
export interface SubmissionResult extends Completion {
  readonly hpasid: number;
  readonly generation: number;
}

import type { ConformRole } from "../clause.js";
import type { AnyRoleSuite } from "../suite.js";
import { coreSuite } from "./core.js";
import { kvmSuite } from "./kvm.js";
import { vdcmSuite } from "./vdcm.js";
import { vfioSuite } from "./vfio.js";

/** Each role's suite. */
export const SUITES: Partial<Record<ConformRole, AnyRoleSuite>> = {
  kvm: kvmSuite,
  vdcm: vdcmSuite,
  vfio: vfioSuite,
  core: coreSuite,
};

import type { ConformRole } from "../clause.js";
import type { AnyRoleSuite } from "../suite.js";
import { coreSuite } from "./core.js";
import { iommuSuite } from "./iommu.js";
import { kvmSuite } from "./kvm.js";
import { vdcmSuite } from "./vdcm.js";
import { vfioSuite } from "./vfio.js";

/** Each role's suite, in the order of DESIGN §1 (the core last: it is verified with the kit playing the roles). */
export const SUITES: Partial<Record<ConformRole, AnyRoleSuite>> = {
  kvm: kvmSuite,
  vdcm: vdcmSuite,
  iommu: iommuSuite,
  vfio: vfioSuite,
  core: coreSuite,
};

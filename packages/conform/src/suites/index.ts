import type { ConformRole } from "../clause.js";
import type { AnyRoleSuite } from "../suite.js";
import { iommuSuite } from "./iommu.js";
import { kvmSuite } from "./kvm.js";

/** Each role's suite. */
export const SUITES: Partial<Record<ConformRole, AnyRoleSuite>> = {
  kvm: kvmSuite,
  iommu: iommuSuite,
};

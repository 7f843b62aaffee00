/**
 * The checker's rules, one file per invariant of DESIGN §7 under `invariant-rules/` (S1…S9,
 * L1…L4), over the typed history; what they share is in `invariant-rules/rule-kit.ts`.
 */
import { S1 } from "./invariant-rules/s1.js";
import { S2 } from "./invariant-rules/s2.js";
import { S3 } from "./invariant-rules/s3.js";
import { S4 } from "./invariant-rules/s4.js";
import { S5 } from "./invariant-rules/s5.js";
import { S6 } from "./invariant-rules/s6.js";
import { S7 } from "./invariant-rules/s7.js";
import { S8 } from "./invariant-rules/s8.js";
import { S9 } from "./invariant-rules/s9.js";
import { L1 } from "./invariant-rules/l1.js";
import { L2 } from "./invariant-rules/l2.js";
import { L3 } from "./invariant-rules/l3.js";
import { L4 } from "./invariant-rules/l4.js";
import type { Rule } from "./invariant-rules/rule-kit.js";

export {
  RECONNECT_GRACE_MS,
  resolveCheckOptions,
  SELF_EXIT_LEAD_MS,
  type CheckOptions,
  type Finding,
  type ResolvedCheckOptions,
  type Rule,
  type RuleContext,
} from "./invariant-rules/rule-kit.js";

/** The checker's rules, one per invariant of DESIGN §7, in order. */
export const RULES: readonly Rule[] = [S1, S2, S3, S4, S5, S6, S7, S8, S9, L1, L2, L3, L4];

import type { HistoryActionInput, HistoryFields } from "@ioasid/bus";
import type { Operation } from "./operation.js";

/**
 * The audit record of an operator action the operation carries (DESIGN §3: "force-release is the
 * operator's, audited"; issue 14: allocator registration too), or undefined for any other operation.
 * The core emits it with the operation's own history — before the reference change it explains — so
 * it is published once the operation is durable and published again by a replay that finds it
 * missing; a record can neither precede an action a crash took back nor be lost with a crash.
 */
export function auditRecordOf(op: Operation): readonly [HistoryActionInput, HistoryFields] | undefined {
  switch (op.kind) {
    case "put": {
      const a = op.audit;
      if (a === undefined) return undefined;
      const h = op.holder;
      return [
        {
          $case: "forceRelease",
          value: {
            holder: `${h.role}/${h.instance}/${h.purpose}`,
            reason: a.reason,
            references: [{ ioasid: op.ioasid, generation: op.generation, setId: op.setId, purpose: h.purpose, count: 1 }],
            operator: a.operator,
            onBehalfOf: a.onBehalfOf,
          },
        },
        { ioasid: op.ioasid, setId: op.setId, ...(op.generation === 0 ? {} : { generation: op.generation }) },
      ];
    }
    case "registerAllocator":
    case "unregisterAllocator": {
      const a = op.audit;
      if (a === undefined) return undefined;
      return [
        {
          $case: "allocatorChange",
          value: {
            operator: a.operator,
            registered: op.kind === "registerAllocator",
            name: op.name,
            address: op.kind === "registerAllocator" ? op.address : "",
            reason: a.reason,
            onBehalfOf: a.onBehalfOf,
          },
        },
        {},
      ];
    }
    default:
      return undefined;
  }
}

import { userInfo } from "node:os";
import type { ParseArgsConfig } from "node:util";
import { connect } from "@nats-io/transport-node";
import { HistoryRecorder } from "@ioasid/bus";
import { isDomainError } from "@ioasid/errors";
import { auditMetadata } from "@ioasid/grpc-kit";
import type { HeldReference } from "@ioasid/role-kit";
import { core } from "@ioasid/proto";
import { addressesOf, connectStack, natsServers, type StackAddresses, type StackClients } from "./clients.js";
import { UsageError } from "./usage-error.js";
import { readState } from "./stack.js";

// `ioasidctl holder release`: the operator's force-release of a dead holder's references (DESIGN
// §4.4: "its references stay held … until that component comes back and reconciles (or an operator
// force-releases with an audit record)"). Each reference goes through the core's Put (so the core
// records every `ioasid_put` and reclaims at zero as usual), and one `force_release` audit record —
// who, why, which holder, which IOASIDs — goes to the recorded history before anything is released.

/** Which holder to release: `role/instance`, optionally one purpose. */
export interface HolderSelector {
  readonly role: string;
  readonly instance: string;
  /** Undefined: every purpose of role/instance. */
  readonly purpose?: string;
}

/** One reference a holder has (role-kit's, as the roles reconcile against it). */
export type { HeldReference };

/** What a force-release did. */
export interface ReleaseResult {
  readonly held: readonly HeldReference[];
  /** References dropped (a count per IOASID and purpose, summed). */
  readonly released: number;
  /** IOASIDs reclaimed by the release. */
  readonly reclaimed: readonly number[];
}

/** Every reference the selected holder has, on any IOASID of any set. */
export async function heldBy(c: StackClients, sel: HolderSelector): Promise<HeldReference[]> {
  const { ioasids } = await c.core.listIoasids({ setId: 0 });
  const out: HeldReference[] = [];
  for (const info of ioasids) {
    for (const h of info.holders) {
      const holder = h.holder;
      if (holder === undefined || holder.role !== sel.role || holder.instance !== sel.instance) continue;
      if (sel.purpose !== undefined && holder.purpose !== sel.purpose) continue;
      out.push({ setId: info.setId, ioasid: info.ioasid, generation: info.generation, purpose: holder.purpose, count: h.count });
    }
  }
  return out.sort((a, b) => a.ioasid - b.ioasid || a.purpose.localeCompare(b.purpose));
}

/**
 * Force-releases the holder's references: one Put per reference, each carrying the reason (and
 * `audit.operator` as whom the call is made for) as call metadata, from which the core — having
 * authenticated the operator's certificate — writes each audit record. Against an insecure stack
 * (`stack.tls` absent) the audit record is written here first, flushed before any Put. A reference
 * that went away meanwhile (released, IOASID reclaimed) is skipped.
 */
export async function forceRelease(
  c: StackClients,
  stack: Pick<StackAddresses, "natsUrl" | "natsAuth" | "tls">,
  sel: HolderSelector,
  audit: { readonly operator: string; readonly reason: string },
): Promise<ReleaseResult> {
  const held = await heldBy(c, sel);
  if (stack.tls === undefined) await recordOwnAudit(stack, sel, held, audit);
  const metadata = auditMetadata({ reason: audit.reason, onBehalfOf: audit.operator });
  let released = 0;
  const reclaimed: number[] = [];
  for (const h of held) {
    for (let i = 0; i < h.count; i++) {
      try {
        const r = await c.core.put(
          core.PutRequest.fromPartial({
            setId: h.setId,
            ioasid: h.ioasid,
            generation: h.generation,
            holder: { role: sel.role, instance: sel.instance, purpose: h.purpose },
          }),
          { metadata },
        );
        released++;
        if (r.refcount === 0) reclaimed.push(h.ioasid);
      } catch (err) {
        if (["NO_REFERENCE_HELD", "IOASID_NOT_FOUND", "STALE_GENERATION", "SET_UNKNOWN"].some((reason) => isDomainError(err, reason))) break;
        throw err;
      }
    }
  }
  return { held, released, reclaimed };
}

/** The audit record of a force-release against an insecure stack: written by the command itself, unauthenticated. */
async function recordOwnAudit(
  nats: Pick<StackAddresses, "natsUrl" | "natsAuth">,
  sel: HolderSelector,
  held: readonly HeldReference[],
  audit: { readonly operator: string; readonly reason: string },
): Promise<void> {
  const nc = await connect({ servers: natsServers(nats.natsUrl), name: "ioasidctl-holder-release", ...nats.natsAuth });
  try {
    const history = new HistoryRecorder(nc, "operator", audit.operator);
    const who = `${sel.role}/${sel.instance}${sel.purpose === undefined ? "/*" : `/${sel.purpose}`}`;
    history.record({
      $case: "forceRelease",
      value: {
        holder: who,
        reason: audit.reason,
        references: held.map((h) => ({ ioasid: h.ioasid, generation: h.generation, setId: h.setId, purpose: h.purpose, count: h.count })),
      },
    });
    history.flush();
    await nc.flush();
  } finally {
    await nc.close();
  }
}

/** A command of the CLI's table. */
export interface HolderCommand {
  readonly summary: string;
  readonly usage: string;
  readonly options: NonNullable<ParseArgsConfig["options"]>;
  readonly run: (values: Record<string, string | boolean | undefined>, positionals: string[]) => Promise<number>;
}

/** `ioasidctl holder list|release`. */
export function holderCommands(out: (line: string) => void): Record<"holder", HolderCommand> {
  return {
    holder: {
      summary: "a holder's references: `holder list|release --role R --instance I [--purpose P]` (release: an operator's audited force-release)",
      usage:
        "ioasidctl holder list --role ROLE --instance INSTANCE [--purpose P] [--dir .ioasid]\n" +
        "ioasidctl holder release --role ROLE --instance INSTANCE [--purpose P] --reason TEXT [--operator NAME] [--dry-run] [--dir .ioasid]\n" +
        "  release drops every reference of a holder that is gone for good (a role that will not come back to\n" +
        "  reconcile), so its IOASIDs can be reclaimed. It Puts each reference through the core with the reason;\n" +
        "  the core, having authenticated this operator's certificate, records a `force_release` audit record\n" +
        "  per reference in the history (operator, --operator NAME as whom it acts for, reason, holder, IOASID).\n" +
        "  Against an --insecure stack the command records one `force_release` itself first (unauthenticated).\n" +
        "  A holder that is still running must not be released: it would keep using PASIDs the core reuses.",
      options: {
        dir: { type: "string", default: ".ioasid" },
        role: { type: "string" },
        instance: { type: "string" },
        purpose: { type: "string" },
        reason: { type: "string" },
        operator: { type: "string" },
        "dry-run": { type: "boolean", default: false },
      },
      // A UsageError goes to main, which prints it with this usage and exits 2.
      run: (v, pos) => runHolder(v, pos, out),
    },
  };
}

async function runHolder(v: Record<string, string | boolean | undefined>, pos: string[], out: (line: string) => void): Promise<number> {
  const [action, ...rest] = pos;
  if ((action !== "list" && action !== "release") || rest.length > 0) throw new UsageError("holder takes `list` or `release`");
  const role = v["role"] as string | undefined;
  const instance = v["instance"] as string | undefined;
  if (role === undefined || role === "" || instance === undefined || instance === "") throw new UsageError("--role and --instance are required");
  const sel: HolderSelector = { role, instance, ...(v["purpose"] === undefined ? {} : { purpose: v["purpose"] as string }) };
  const reason = (v["reason"] as string | undefined)?.trim() ?? "";
  if (action === "release" && v["dry-run"] !== true && reason === "") throw new UsageError("release needs --reason TEXT: it goes into the audit record");
  const state = readState(v["dir"] as string);
  const addresses = addressesOf(state);
  const c = await connectStack(addresses);
  try {
    const held = await heldBy(c, sel);
    const who = `${role}/${instance}${sel.purpose === undefined ? "" : `/${sel.purpose}`}`;
    if (held.length === 0) {
      out(`${who} holds no reference`);
      return 0;
    }
    for (const h of held) out(`  IOASID ${h.ioasid} gen ${h.generation} set ${h.setId}  ${role}/${instance}/${h.purpose} ×${h.count}`);
    if (action === "list" || v["dry-run"] === true) {
      out(`${who} holds ${held.reduce((n, h) => n + h.count, 0)} reference(s)${action === "release" ? " (dry run: nothing released)" : ""}`);
      return 0;
    }
    const operator = (v["operator"] as string | undefined) ?? userInfo().username;
    const r = await forceRelease(c, addresses, sel, { operator, reason });
    out(
      `force-released ${r.released} reference(s) of ${who} (${addresses.tls === undefined ? "audit recorded by ioasidctl, unauthenticated" : "audit recorded by the core"}, for ${operator}: "${reason}")${r.reclaimed.length === 0 ? "" : `; reclaimed ${r.reclaimed.join(", ")}`}`,
    );
    return 0;
  } finally {
    await c.close();
  }
}

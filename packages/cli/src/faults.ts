import { isDomainError } from "@ioasid/errors";
import { iommu, vfio } from "@ioasid/proto";
import type { StackClients } from "./clients.js";
import { UsageError } from "./usage-error.js";

// ioasidctl's IO page fault verbs (DESIGN §5 "Faults"): the device side (`dma`: a DMA through the
// IOMMU, and with --wait the PRI round trip: page request, response, retry), the guest side
// (`faults watch`: the VMM's WatchFaults stream, optionally answering as the guest would) and
// `fault respond` (one answer by hand), plus `guest-ram`: the VMM mapping guest memory into the
// VM's stage-2 domain, without which no nested translation can complete.

export { UsageError };

/** One 4 KiB page: the granule of page requests and mappings. */
export const PAGE_SIZE = 0x1000n;
const MAX_PRGI = 511;
const MAX_PASID = (1 << 20) - 1;
const MAX_U64 = (1n << 64n) - 1n;

/** The access of a DMA request or a mapping. */
export interface Access {
  readonly read: boolean;
  readonly write: boolean;
}
const RW: Access = { read: true, write: true };

/** The answers a guest gives a fault group, as `--respond`/`--code` take them. */
export const RESPONSE_CODES = {
  success: vfio.PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS,
  invalid: vfio.PageResponseCode.PAGE_RESPONSE_CODE_INVALID,
  failure: vfio.PageResponseCode.PAGE_RESPONSE_CODE_FAILURE,
} as const;
/** An answer by its flag name: success, invalid, failure. */
export type ResponseCodeName = keyof typeof RESPONSE_CODES;

type Values = Readonly<Record<string, string | boolean | undefined>>;

/** Parses an address or size: decimal or 0x-hex, 0..2^64−1. @throws UsageError */
export function parseAddress(v: string | boolean | undefined, flag: string): bigint {
  if (typeof v !== "string" || !/^(0x[0-9a-f]+|[0-9]+)$/i.test(v.trim()))
    throw new UsageError(`--${flag} must be an address (decimal or 0x-hex), got ${String(v)}`);
  const n = BigInt(v.trim());
  if (n > MAX_U64) throw new UsageError(`--${flag} must fit in 64 bits, got ${v}`);
  return n;
}

function parsePageAligned(v: string | boolean | undefined, flag: string): bigint {
  const n = parseAddress(v, flag);
  if (n % PAGE_SIZE !== 0n) throw new UsageError(`--${flag} must be 4 KiB aligned, got 0x${n.toString(16)}`);
  return n;
}

/** Parses an integer flag within [min, max]. @throws UsageError */
export function parseInteger(v: string | boolean | undefined, flag: string, min: number, max: number): number {
  const n = typeof v === "string" && /^[0-9]+$/.test(v.trim()) ? Number(v) : NaN;
  if (!Number.isSafeInteger(n) || n < min || n > max) throw new UsageError(`--${flag} must be an integer in ${min}..${max}, got ${String(v)}`);
  return n;
}

/** Parses `--access r|w|rw`. @throws UsageError */
export function parseAccess(v: string | boolean | undefined): Access {
  switch (v) {
    case "r":
      return { read: true, write: false };
    case "w":
      return { read: false, write: true };
    case "rw":
    case "wr":
      return RW;
    default:
      throw new UsageError(`--access must be r, w or rw, got ${String(v)}`);
  }
}

function parseCode(v: string | boolean | undefined, flag: string): ResponseCodeName {
  if (typeof v === "string" && Object.hasOwn(RESPONSE_CODES, v.toLowerCase())) return v.toLowerCase() as ResponseCodeName;
  throw new UsageError(`--${flag} must be success, invalid or failure, got ${String(v)}`);
}

const str = (v: string | boolean | undefined): string | undefined => (typeof v === "string" && v !== "" ? v : undefined);

/** What `ioasidctl dma` was asked to do. */
export interface DmaOptions {
  readonly deviceId: string;
  /** 0 with `withoutPasid`. */
  readonly pasid: number;
  readonly withoutPasid: boolean;
  readonly address: bigint;
  readonly access: Access;
  /** The page-request group hint; none: a miss forms a group by itself. */
  readonly group?: { readonly prgi: number; readonly lastRequest: boolean };
  readonly wait: boolean;
  /** How long --wait waits for the page response, ms. */
  readonly timeoutMs: number;
  readonly json: boolean;
}

/** The default of `dma --timeout-ms`. */
export const DEFAULT_DMA_TIMEOUT_MS = 10_000;

/** Checks and converts `dma`'s flags. @throws UsageError */
export function parseDmaOptions(v: Values): DmaOptions {
  const deviceId = str(v["device"]);
  if (deviceId === undefined) throw new UsageError("--device is required (the device issuing the DMA, as registered at the IOMMU)");
  const withoutPasid = v["without-pasid"] === true;
  if (withoutPasid === (v["pasid"] !== undefined)) throw new UsageError("give exactly one of --pasid HPASID and --without-pasid");
  const pasid = withoutPasid ? 0 : parseInteger(v["pasid"], "pasid", 1, MAX_PASID);
  if (v["address"] === undefined) throw new UsageError("--address is required");
  const address = parseAddress(v["address"], "address");
  const access = parseAccess(v["access"] ?? "r");
  const last = v["last"] === true;
  const notLast = v["not-last"] === true;
  let group: DmaOptions["group"];
  if (v["prgi"] !== undefined) {
    if (last === notLast) throw new UsageError("--prgi needs exactly one of --last and --not-last");
    group = { prgi: parseInteger(v["prgi"], "prgi", 0, MAX_PRGI), lastRequest: last };
  } else if (last || notLast) throw new UsageError("--last and --not-last go with --prgi N");
  const wait = v["wait"] === true;
  if (v["timeout-ms"] !== undefined && !wait) throw new UsageError("--timeout-ms bounds --wait: give --wait too");
  const timeoutMs = v["timeout-ms"] === undefined ? DEFAULT_DMA_TIMEOUT_MS : parseInteger(v["timeout-ms"], "timeout-ms", 1, 3_600_000);
  return { deviceId, pasid, withoutPasid, address, access, ...(group === undefined ? {} : { group }), wait, timeoutMs, json: v["json"] === true };
}

/** What `ioasidctl faults watch` was asked to do. */
export interface WatchOptions {
  readonly vm: string | undefined;
  /** Answer every group with this code (SUCCESS after installing its pages); none: only print. */
  readonly respond?: ResponseCodeName;
  /** GVA page → GPA `mapGpaBase + GVA page` when answering SUCCESS. */
  readonly mapGpaBase: bigint;
  /** Stop after this many stream items. */
  readonly count?: number;
  /** Stop after this long, ms. */
  readonly timeoutMs?: number;
  readonly json: boolean;
}

/** Checks and converts `faults watch`'s flags. @throws UsageError */
export function parseWatchOptions(v: Values): WatchOptions {
  const respond = v["respond"] === undefined ? undefined : parseCode(v["respond"], "respond");
  if (v["map-gpa-base"] !== undefined && respond !== "success")
    throw new UsageError("--map-gpa-base is where --respond success installs pages: give --respond success too");
  const mapGpaBase = v["map-gpa-base"] === undefined ? 0n : parsePageAligned(v["map-gpa-base"], "map-gpa-base");
  const count = v["count"] === undefined ? undefined : parseInteger(v["count"], "count", 1, Number.MAX_SAFE_INTEGER);
  const timeoutMs = v["timeout-ms"] === undefined ? undefined : parseInteger(v["timeout-ms"], "timeout-ms", 1, 24 * 3_600_000);
  return {
    vm: str(v["vm"]),
    ...(respond === undefined ? {} : { respond }),
    mapGpaBase,
    ...(count === undefined ? {} : { count }),
    ...(timeoutMs === undefined ? {} : { timeoutMs }),
    json: v["json"] === true,
  };
}

/** What `ioasidctl fault respond` was asked to do. */
export interface RespondOptions {
  readonly vm: string | undefined;
  readonly faultGroupId: bigint;
  readonly code: ResponseCodeName;
}

/** Checks and converts `fault respond`'s flags. @throws UsageError */
export function parseRespondOptions(v: Values): RespondOptions {
  if (v["group"] === undefined) throw new UsageError("--group ID is required (the fault group id `faults watch` printed)");
  const faultGroupId = parseAddress(v["group"], "group");
  if (faultGroupId === 0n) throw new UsageError("--group must be a fault group id (never 0)");
  if (v["code"] === undefined) throw new UsageError("--code success|invalid|failure is required");
  return { vm: str(v["vm"]), faultGroupId, code: parseCode(v["code"], "code") };
}

/** What `ioasidctl guest-ram` was asked to map. */
export interface GuestRamOptions {
  readonly vm: string | undefined;
  readonly gpa: bigint;
  readonly size: bigint;
  /** Host physical address; undefined: the first host address VFIO gave the VM's container. */
  readonly hpa: bigint | undefined;
}

/**
 * Defaults of `guest-ram`: 1 GiB of guest RAM at GPA 0 (VFIO's default guest memory), backed by the
 * host memory VFIO gave the VM (MapDma maps nothing else: OpenContainerResponse.guest_memory).
 */
export const GUEST_RAM_DEFAULTS = { gpa: 0n, size: 0x4000_0000n } as const;

/** Checks and converts `guest-ram`'s flags. @throws UsageError */
export function parseGuestRamOptions(v: Values): GuestRamOptions {
  const gpa = v["gpa"] === undefined ? GUEST_RAM_DEFAULTS.gpa : parsePageAligned(v["gpa"], "gpa");
  const size = v["size"] === undefined ? GUEST_RAM_DEFAULTS.size : parsePageAligned(v["size"], "size");
  const hpa = v["hpa"] === undefined ? undefined : parsePageAligned(v["hpa"], "hpa");
  if (size === 0n) throw new UsageError("--size must be at least one 4 KiB page");
  if (gpa + size - 1n > MAX_U64 || (hpa ?? 0n) + size - 1n > MAX_U64) throw new UsageError("--gpa/--hpa + --size must stay below 2^64");
  return { vm: str(v["vm"]), gpa, size, hpa };
}

// ---- formatting ----

const hex = (n: bigint) => `0x${n.toString(16)}`;
const strip = (s: string, prefix: string) => (s.startsWith(prefix) ? s.slice(prefix.length) : s);

/** `r`, `w`, `rw` (and `x`, `p` for execute and privileged). */
export function formatAccess(a: Partial<iommu.DmaAccess> | undefined): string {
  return `${a?.read === true ? "r" : ""}${a?.write === true ? "w" : ""}${a?.execute === true ? "x" : ""}${a?.privileged === true ? "p" : ""}` || "-";
}

/** The response code's short name: SUCCESS, INVALID, FAILURE. */
export function codeName(code: vfio.PageResponseCode | iommu.PageResponseCode): string {
  return strip(vfio.pageResponseCodeToJSON(code as vfio.PageResponseCode), "PAGE_RESPONSE_CODE_");
}

/** Who answered, short: HANDLER, TIMEOUT, DETACH… */
export function sourceName(source: string | iommu.PageResponseSource): string {
  return strip(typeof source === "string" ? source : iommu.pageResponseSourceToJSON(source), "PAGE_RESPONSE_SOURCE_");
}

function deviceName(d: vfio.DeviceRef | undefined): string {
  if (d?.ref?.$case === "mdevUuid") return `mdev ${d.ref.value}`;
  if (d?.ref?.$case === "deviceId") return `device ${d.ref.value}`;
  return "device ?";
}

/** One line for a Translate outcome. */
export function formatTranslate(o: DmaOptions, r: iommu.TranslateResponse): string {
  const where = `${o.deviceId} ${o.withoutPasid ? "without PASID" : `PASID ${o.pasid}`} ${hex(o.address)} (${formatAccess(o.access)})`;
  switch (r.outcome) {
    case iommu.TranslateOutcome.TRANSLATE_OUTCOME_TRANSLATED:
      return `TRANSLATED ${where} -> ${hex(r.outputAddress)} (handle ${r.handleId})`;
    case iommu.TranslateOutcome.TRANSLATE_OUTCOME_PAGE_REQUEST:
      return `PAGE_REQUEST ${where}: fault group ${r.faultGroupId} ${r.groupComplete ? "complete, sent to its handler" : "partial, waiting for its last request"}`;
    case iommu.TranslateOutcome.TRANSLATE_OUTCOME_FAULT:
      return `FAULT ${where}: ${strip(iommu.faultReasonToJSON(r.faultReason), "FAULT_REASON_")}${r.faultGroupId === 0n ? "" : ` (group ${r.faultGroupId} answered INVALID)`}`;
    default:
      return `${iommu.translateOutcomeToJSON(r.outcome)} ${where}`;
  }
}

/** A Translate outcome as JSON-ready data. */
export function translateJson(r: iommu.TranslateResponse): Record<string, unknown> {
  return {
    outcome: strip(iommu.translateOutcomeToJSON(r.outcome), "TRANSLATE_OUTCOME_"),
    ...(r.outcome === iommu.TranslateOutcome.TRANSLATE_OUTCOME_TRANSLATED ? { outputAddress: hex(r.outputAddress) } : {}),
    handleId: String(r.handleId),
    ...(r.faultGroupId === 0n ? {} : { faultGroupId: String(r.faultGroupId), groupComplete: r.groupComplete }),
    ...(r.outcome === iommu.TranslateOutcome.TRANSLATE_OUTCOME_FAULT ? { faultReason: strip(iommu.faultReasonToJSON(r.faultReason), "FAULT_REASON_") } : {}),
  };
}

/** One line for an item of a WatchFaults stream. */
export function formatWatchItem(m: vfio.WatchFaultsResponse): string {
  const item = m.item;
  switch (item?.$case) {
    case "group": {
      const g = item.value;
      const reqs = g.requests.map((r) => `${hex(r.address)}(${formatAccess(r.access)}${r.lastRequest ? ",last" : ""})`).join(" ");
      return `group ${g.faultGroupId}  ${deviceName(g.device)}  hpasid ${g.hpasid} gpasid ${g.gpasid}  prgi ${g.prgi}  requests ${reqs}`;
    }
    case "fault": {
      const f = item.value;
      return `fault ${f.faultId}  ${deviceName(f.device)}  hpasid ${f.hpasid} gpasid ${f.gpasid}  ${hex(f.address)}(${formatAccess(f.access)})  ${strip(f.reason, "FAULT_REASON_")}`;
    }
    case "answered":
      return `answered group ${item.value.faultGroupId}: ${codeName(item.value.code)} by ${sourceName(item.value.source)}`;
    default:
      return "unknown item";
  }
}

/** An item of a WatchFaults stream as JSON-ready data (one `--json` line). */
export function watchItemJson(m: vfio.WatchFaultsResponse): Record<string, unknown> {
  const item = m.item;
  const device = (d: vfio.DeviceRef | undefined) => (d?.ref === undefined ? null : { [d.ref.$case]: d.ref.value });
  switch (item?.$case) {
    case "group": {
      const g = item.value;
      return {
        kind: "group",
        faultGroupId: String(g.faultGroupId),
        device: device(g.device),
        hpasid: g.hpasid,
        gpasid: g.gpasid,
        prgi: g.prgi,
        requests: g.requests.map((r) => ({ address: hex(r.address), access: formatAccess(r.access), lastRequest: r.lastRequest })),
        deadline: g.deadline?.toISOString() ?? null,
      };
    }
    case "fault": {
      const f = item.value;
      return {
        kind: "fault",
        faultId: String(f.faultId),
        device: device(f.device),
        hpasid: f.hpasid,
        gpasid: f.gpasid,
        address: hex(f.address),
        access: formatAccess(f.access),
        reason: strip(f.reason, "FAULT_REASON_"),
      };
    }
    case "answered":
      return { kind: "answered", faultGroupId: String(item.value.faultGroupId), code: codeName(item.value.code), source: sourceName(item.value.source) };
    default:
      return { kind: "unknown" };
  }
}

/**
 * The pages a guest installs to answer a group SUCCESS: each requested GVA page (once, in request
 * order) at GPA `gpaBase + GVA page` — the guest's linear map of its RAM; with the default base 0
 * a GVA maps to the same GPA.
 */
export function guestPagesOf(g: Pick<vfio.FaultGroup, "requests">, gpaBase: bigint): Array<{ iova: bigint; gpa: bigint }> {
  const seen = new Set<bigint>();
  const pages: Array<{ iova: bigint; gpa: bigint }> = [];
  for (const r of g.requests) {
    const iova = r.address - (r.address % PAGE_SIZE);
    if (seen.has(iova)) continue;
    seen.add(iova);
    pages.push({ iova, gpa: (gpaBase + iova) & MAX_U64 });
  }
  return pages;
}

// ---- the guest's answer ----

/** What {@link answerFaultGroup} did. */
export interface GroupAnswer {
  readonly faultGroupId: bigint;
  /** The code sent (INVALID when SUCCESS was asked but a page could not be installed). */
  readonly code: ResponseCodeName;
  /** Pages installed (GVA → GPA); those already present are counted in `present`. */
  readonly mapped: ReadonlyArray<{ iova: bigint; gpa: bigint }>;
  readonly present: number;
  /** Why SUCCESS became INVALID, or why the answer was refused. */
  readonly problem?: string;
  /** False when VFIO refused the answer (e.g. FAULT_GROUP_ALREADY_RESPONDED: a timeout was first). */
  readonly sent: boolean;
}

/**
 * Answers one relayed group as the guest: for SUCCESS it first installs every requested page in
 * the first-stage table of the group's PASID (MapGuestPages, read+write; a page already present is
 * fine), and answers INVALID instead if a page cannot be installed; then SendPageResponse. Never
 * throws for a refusal of the service: it is returned in `problem`.
 */
export async function answerFaultGroup(
  client: Pick<StackClients["vfio"], "mapGuestPages" | "sendPageResponse">,
  containerId: number,
  g: vfio.FaultGroup,
  code: ResponseCodeName,
  gpaBase = 0n,
): Promise<GroupAnswer> {
  const mapped: Array<{ iova: bigint; gpa: bigint }> = [];
  let present = 0;
  let problem: string | undefined;
  let answer = code;
  if (code === "success") {
    for (const p of guestPagesOf(g, gpaBase)) {
      try {
        await client.mapGuestPages({
          containerId,
          hpasid: g.hpasid,
          generation: 0,
          iova: p.iova,
          gpa: p.gpa,
          size: PAGE_SIZE,
          access: { ...RW, execute: false, privileged: false },
        });
        mapped.push(p);
      } catch (err) {
        if (isDomainError(err, "IOVA_ALREADY_MAPPED")) present++;
        else {
          problem = `installing GVA ${hex(p.iova)} failed: ${describeError(err)}`;
          answer = "invalid";
          break;
        }
      }
    }
  }
  try {
    await client.sendPageResponse({ containerId, faultGroupId: g.faultGroupId, code: RESPONSE_CODES[answer] });
    return { faultGroupId: g.faultGroupId, code: answer, mapped, present, ...(problem === undefined ? {} : { problem }), sent: true };
  } catch (err) {
    return {
      faultGroupId: g.faultGroupId,
      code: answer,
      mapped,
      present,
      problem: `${problem === undefined ? "" : `${problem}; `}answer refused: ${describeError(err)}`,
      sent: false,
    };
  }
}

/** `REASON: message` for a service refusal, the message otherwise. */
export function describeError(err: unknown): string {
  const e = err as { reason?: unknown; message?: unknown };
  return isDomainError(err) ? `${String(e.reason)}: ${String(e.message)}` : String(e.message ?? err);
}

/** One line for a guest's answer. */
export function formatAnswer(a: GroupAnswer): string {
  const pages = a.mapped.map((p) => `${hex(p.iova)}->gpa ${hex(p.gpa)}`).join(", ");
  const installed = a.mapped.length + a.present === 0 ? "" : `installed ${pages || "nothing new"}${a.present === 0 ? "" : ` (${a.present} already present)`}; `;
  return `${installed}${a.sent ? `answered group ${a.faultGroupId} ${a.code.toUpperCase()}` : `group ${a.faultGroupId} not answered`}${a.problem === undefined ? "" : ` — ${a.problem}`}`;
}

/** A guest's answer as JSON-ready data. */
export function answerJson(a: GroupAnswer): Record<string, unknown> {
  return {
    kind: "response",
    faultGroupId: String(a.faultGroupId),
    code: a.code.toUpperCase(),
    sent: a.sent,
    mapped: a.mapped.map((p) => ({ gva: hex(p.iova), gpa: hex(p.gpa) })),
    alreadyPresent: a.present,
    ...(a.problem === undefined ? {} : { problem: a.problem }),
  };
}

/** JSON with 64-bit values as strings, on one line. */
export const jsonLine = (v: unknown): string => JSON.stringify(v, (_k, x: unknown) => (typeof x === "bigint" ? x.toString() : x));

import { randomBytes } from "node:crypto";

// Order without clocks (DESIGN §7, issue 18): what lets the checker order history records of
// processes on different hosts, whose clocks differ. Each recorder numbers its records
// (`publisher_seq`, with the process's `incarnation`), and a message between components carries
// its sender's position — the last record the sender had made — so that the first record the
// receiver makes after it names that position (`after`): a causal link. The delivery engine sends
// the core's position with each delivery, a subscriber sends its own with its acknowledgement; a
// gRPC call carries the caller's positions in its metadata and the server's in its trailers.
// Here beside the trace context, which travels the same ways.

/** A publisher's position: its records up to `publisherSeq` (proto `ioasid.history.v1.HistoryLink`). */
export interface HistoryLink {
  readonly role: string;
  readonly instance: string;
  readonly incarnation: string;
  readonly publisherSeq: number;
}

/** This process's incarnation: a random id per process start (`publisher_seq` counts again from 1). */
export const PROCESS_INCARNATION = randomBytes(6).toString("hex");

/** The NATS header that carries the sender's position (a delivery batch, an ack batch). */
export const POSITION_HEADER = "Ioasid-History-After";
/** The gRPC metadata key that carries positions (a call's request metadata, its trailers). */
export const POSITION_METADATA = "ioasid-history-after";

/** The key of a publisher: `role/instance/incarnation`. */
export function publisherKey(p: { readonly role: string; readonly instance: string; readonly incarnation: string }): string {
  return `${p.role}/${p.instance}/${p.incarnation}`;
}

/**
 * Positions this process received, by publisher, each numbered in the order received: a window of
 * the latest {@link RECEIVED_WINDOW} receipts at least (older ones are dropped, so a recorder that
 * made no record for that long may name fewer links: two records left unordered, never a wrong
 * order). Kept per publisher so that a recorder's next record costs the publishers it hears from,
 * not the receipts since its last record: a KVM process has a recorder per VM, and with a thousand
 * VMs each record scanned thousands of receipts (issue 15: 0.9 s of a 200-guest crowd's 4.9 s).
 */
const publishers = new Map<string, ReceivedFrom>();
/** Receipts so far (the next one's number). */
let receivedTotal = 0;
/** Receipts numbered below this are out of the window. */
let receivedBase = 0;

/** What was received from one publisher, within the window. */
interface ReceivedFrom {
  /** Receipt numbers, ascending (from `first` on: those before are out of the window). */
  readonly at: number[];
  first: number;
  /**
   * The suffix maxima: receipts whose link is newer than every later receipt's, ascending by
   * receipt number (so descending by `publisherSeq`), from `maxFirst` on. The newest link received
   * at or after a receipt number is the first of these at or after it (one entry while a
   * publisher's positions arrive in order).
   */
  readonly max: Array<{ readonly at: number; readonly link: HistoryLink }>;
  maxFirst: number;
}

/** Positions kept for recorders that have not made a record since they were received. */
export const RECEIVED_WINDOW = 4096;

/** Where a recorder is in what this process received (see {@link takeReceived}). */
export interface ReceivedCursor {
  at: number;
}

/** A cursor at the end of what was received so far: a new recorder follows only what it receives from now on. */
export function receivedCursor(): ReceivedCursor {
  return { at: receivedTotal };
}

/** Notes positions a message carried: records this process makes from now on follow them. */
export function noteReceived(links: readonly HistoryLink[]): void {
  if (links.length === 0) return;
  for (const l of links) {
    const n = receivedTotal++;
    const k = publisherKey(l);
    let from = publishers.get(k);
    if (from === undefined) publishers.set(k, (from = { at: [], first: 0, max: [], maxFirst: 0 }));
    from.at.push(n);
    while (from.max.length > from.maxFirst && from.max[from.max.length - 1]!.link.publisherSeq <= l.publisherSeq) from.max.pop();
    from.max.push({ at: n, link: { ...l } });
  }
  if (receivedTotal - receivedBase > 2 * RECEIVED_WINDOW) {
    receivedBase = receivedTotal - RECEIVED_WINDOW;
    for (const [k, from] of publishers) {
      from.first = lowerBound(from.at, from.first, receivedBase, (n) => n);
      from.maxFirst = lowerBound(from.max, from.maxFirst, receivedBase, (m) => m.at);
      if (from.first === from.at.length) publishers.delete(k);
      else if (from.first > 1024) {
        from.at.splice(0, from.first);
        from.first = 0;
        from.max.splice(0, from.maxFirst);
        from.maxFirst = 0;
      }
    }
  }
}

/** The first index ≥ `lo` whose key is ≥ `n` (the keys ascending). */
function lowerBound<T>(a: readonly T[], lo: number, n: number, key: (t: T) => number): number {
  let hi = a.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (key(a[mid]!) < n) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/**
 * The positions received since `cursor` last took them, the newest of each publisher, in the order
 * each publisher was first heard from since (moving `cursor` past them): what a recorder's next
 * record names in `after`. Costs the publishers heard from in the window, not what was received.
 */
export function takeReceived(cursor: ReceivedCursor): HistoryLink[] {
  const from = Math.max(cursor.at, receivedBase);
  cursor.at = receivedTotal;
  if (from >= receivedTotal) return [];
  const named: Array<{ first: number; link: HistoryLink }> = [];
  for (const p of publishers.values()) {
    if (p.at[p.at.length - 1]! < from) continue;
    const first = p.at[lowerBound(p.at, p.first, from, (n) => n)]!;
    const newest = p.max[lowerBound(p.max, p.maxFirst, from, (m) => m.at)]!;
    named.push({ first, link: newest.link });
  }
  if (named.length > 1) named.sort((a, b) => a.first - b.first);
  return named.map((n) => ({ ...n.link }));
}

/** What {@link registerPosition} keeps of a recorder: its position, asked when needed. */
export interface PositionSource {
  position(): HistoryLink | undefined;
}

/**
 * The recorders of this process, by the role and instance they record for (see
 * {@link registerPosition}): held weakly, so a recorder let go (a destroyed VM's) is not kept.
 */
const positions = new Map<string, WeakRef<PositionSource>>();
/** Keys of the recorders that numbered a record last, newest first, at most {@link MAX_CALL_POSITIONS}. */
let recent: string[] = [];

/** Most positions a gRPC call or its status carries: those of the recorders that numbered a record last. */
export const MAX_CALL_POSITIONS = 8;

/** Makes a recorder's position what an acknowledgement of `role`/`instance` carries (the newest recorder wins). */
export function registerPosition(role: string, instance: string, source: PositionSource): void {
  const k = `${role}/${instance}`;
  positions.set(k, new WeakRef(source));
  touchPosition(role, instance);
}

/** Marks `role`/`instance`'s recorder as the one that numbered a record last (a recorder calls it with each). */
export function touchPosition(role: string, instance: string): void {
  // Every record a process makes comes here (about ten per reclaimed IOASID across the stack): the
  // recorder that numbered the last one again is answered without building its key.
  if (role === newestRole && instance === newestInstance) return;
  newestRole = role;
  newestInstance = instance;
  const k = `${role}/${instance}`;
  if (recent[0] === k) return;
  recent = [k, ...recent.filter((x) => x !== k)].slice(0, MAX_CALL_POSITIONS);
}
/** The role and instance of `recent[0]`, the recorder that numbered a record last. */
let newestRole: string | undefined;
let newestInstance: string | undefined;

/** The position of this process's recorder for `role`/`instance`, if it has one that recorded. */
export function positionOf(role: string, instance: string): HistoryLink | undefined {
  const k = `${role}/${instance}`;
  const source = positions.get(k)?.deref();
  if (source === undefined) positions.delete(k);
  return source?.position();
}

/**
 * The positions of this process's recorders that numbered a record last, at most
 * {@link MAX_CALL_POSITIONS} (what a gRPC call or its status carries; a KVM process has a recorder
 * per VM, and a link left out only leaves two records unordered).
 */
export function processPositions(): HistoryLink[] {
  const out: HistoryLink[] = [];
  for (const k of recent) {
    const [role = "", ...rest] = k.split("/");
    const l = positionOf(role, rest.join("/"));
    if (l !== undefined) out.push(l);
  }
  return out;
}

/** A header value for positions: `role/instance/incarnation/seq` each, URI-encoded, space-separated. */
export function encodePositions(links: readonly HistoryLink[]): string {
  return links.map((l) => [l.role, l.instance, l.incarnation, String(l.publisherSeq)].map(encodeURIComponent).join("/")).join(" ");
}

/** The positions of a header value; what does not parse is left out (an older sender sends none). */
export function decodePositions(value: string | undefined): HistoryLink[] {
  if (value === undefined || value === "") return [];
  const out: HistoryLink[] = [];
  for (const part of value.split(" ")) {
    const f = part.split("/").map(decodeURIComponent);
    const seq = Number(f[3]);
    if (f.length !== 4 || !Number.isSafeInteger(seq) || seq <= 0) continue;
    out.push({ role: f[0]!, instance: f[1]!, incarnation: f[2]!, publisherSeq: seq });
  }
  return out;
}

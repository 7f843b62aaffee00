import { eventOf, publisherKey, type HistoryRecord } from "@ioasid/bus";

/** The core's history column (also in history-index.ts; here to keep this module a leaf). */
const CORE = "ioasid";

/**
 * Order without clocks (DESIGN §7, issue 18). Processes on different hosts stamp records with
 * clocks that differ, so the checker orders records by what the records carry instead:
 *
 * 1. **Program order**: the records of one publisher (one `role`/`instance` of one process run,
 *    `incarnation`) in their `publisher_seq` order; and a role instance's runs one after another
 *    (a restart follows the run it replaces): runs whose records do not overlap in time, by the
 *    times of one host — a role instance restarts where it ran, so this compares a clock with
 *    itself, never two hosts' clocks (the core's runs are ordered by its op log instead).
 * 2. **The core's operation order**: the core's records by their operation-log message
 *    (`op_seq`), one total order across the core's restarts and a standby taking over.
 * 3. **Event → handling**: a role's record naming event sequence `seq` (the delivery it handles)
 *    follows the core's record of that event (`ioasid_notify` with that `seq`): the core delivers an
 *    event only once its operation is durable and recorded.
 * 4. **Causal links** (`after`): a record follows the positions its publisher had received — a
 *    role's handling follows the core's records up to the delivery's sending (a higher tier's
 *    `delivery_acked` among them), the core's `delivery_acked` follows the subscriber's records up
 *    to its acknowledgement.
 *
 * Happens-before is the transitive closure of these. {@link orderHistory} gives a linear extension
 * of it (records it leaves unordered — of processes no recorded message connects, or of a history
 * recorded before records carried these fields — fall back to their times, in the order of `ts`),
 * and answers whether one record happened before another (vector clocks over the publishers).
 */
export interface HistoryOrder {
  /** Input indices in the order: a linear extension of happens-before, `ts` among the unordered. */
  readonly order: readonly number[];
  /**
   * Whether input record `a` happened before input record `b`: true or false when the
   * sequences and links decide it (false: `b` happened before `a`), undefined when they do not
   * (one of them carries no `publisher_seq`, or the two are concurrent as far as the history shows).
   */
  happenedBefore(a: number, b: number): boolean | undefined;
  /** Records that carry a `publisher_seq` (take part in happens-before). */
  readonly sequenced: number;
  /** Edges that would have closed a cycle (inconsistent sequences), left out; 0 in any real history. */
  readonly cycles: number;
}

/** Above this many vector-clock entries (records × publishers), happens-before is not answered (order is still given). */
const MAX_CLOCK_ENTRIES = 64_000_000;

/** Orders a history by its sequences and causal links (see {@link HistoryOrder}). Pure. */
export function orderHistory(records: readonly HistoryRecord[]): HistoryOrder {
  const n = records.length;
  const preds: number[][] = Array.from({ length: n }, () => []);
  // 1. Program order, per publisher.
  const chains = new Map<string, number[]>();
  const chainOf = new Int32Array(n).fill(-1);
  records.forEach((r, i) => {
    if (r.publisherSeq === undefined) return;
    const k = publisherKey(r);
    let c = chains.get(k);
    if (c === undefined) chains.set(k, (c = []));
    c.push(i);
  });
  const chainList = [...chains.values()];
  const posInChain = new Int32Array(n);
  chainList.forEach((c, ci) => {
    c.sort((a, b) => records[a]!.publisherSeq! - records[b]!.publisherSeq! || a - b);
    c.forEach((idx, p) => {
      chainOf[idx] = ci;
      posInChain[idx] = p + 1;
      if (p > 0) preds[idx]!.push(c[p - 1]!);
    });
  });
  // 1b. A role instance's runs, one after another (same host: its own clock).
  const runs = new Map<string, Array<{ first: number; last: number; from: number; to: number }>>();
  for (const c of chainList) {
    const r = records[c[0]!]!;
    if (r.role === CORE) continue;
    let times = [Infinity, -Infinity];
    for (const i of c) times = [Math.min(times[0]!, records[i]!.ts), Math.max(times[1]!, records[i]!.ts)];
    const k = `${r.role}/${r.instance}`;
    let list = runs.get(k);
    if (list === undefined) runs.set(k, (list = []));
    list.push({ first: c[0]!, last: c.at(-1)!, from: times[0]!, to: times[1]! });
  }
  for (const list of runs.values()) {
    list.sort((a, b) => a.from - b.from);
    for (let p = 1; p < list.length; p++) if (list[p - 1]!.to <= list[p]!.from) preds[list[p]!.first]!.push(list[p - 1]!.last);
  }
  // 2. The core's operation order.
  const ops = records
    .map((r, i) => [r, i] as const)
    .filter(([r]) => r.role === CORE && r.opSeq !== undefined && r.publisherSeq !== undefined)
    .sort(
      ([a, ia], [b, ib]) =>
        a.opSeq! - b.opSeq! || (a.incarnation < b.incarnation ? -1 : a.incarnation > b.incarnation ? 1 : 0) || a.publisherSeq! - b.publisherSeq! || ia - ib,
    );
  for (let p = 1; p < ops.length; p++) preds[ops[p]![1]]!.push(ops[p - 1]![1]);
  // 3. Event → handling.
  const events = new Map<number, number>();
  records.forEach((r, i) => {
    if (r.role === CORE && r.seq !== undefined && r.publisherSeq !== undefined && eventOf(r) !== undefined && !events.has(r.seq)) events.set(r.seq, i);
  });
  records.forEach((r, i) => {
    if (r.role === CORE || r.seq === undefined || r.publisherSeq === undefined) return;
    const e = events.get(r.seq);
    if (e !== undefined) preds[i]!.push(e);
  });
  // 4. Causal links: the linked publisher's newest record at or before the position.
  records.forEach((r, i) => {
    if (r.publisherSeq === undefined) return;
    for (const l of r.after) {
      const c = chains.get(publisherKey(l));
      if (c === undefined) continue;
      let lo = 0;
      let hi = c.length;
      while (lo < hi) {
        const mid = (lo + hi) >> 1;
        if (records[c[mid]!]!.publisherSeq! <= l.publisherSeq) lo = mid + 1;
        else hi = mid;
      }
      if (lo > 0) preds[i]!.push(c[lo - 1]!);
    }
  });

  // A linear extension (Kahn), the earliest `ts` first among the records whose predecessors are placed.
  const succs: number[][] = Array.from({ length: n }, () => []);
  const missing = new Int32Array(n);
  preds.forEach((ps, i) => {
    for (const p of ps) {
      succs[p]!.push(i);
      missing[i]!++;
    }
  });
  const before = (a: number, b: number) => records[a]!.ts - records[b]!.ts || a - b;
  const heap = new MinHeap(before);
  for (let i = 0; i < n; i++) if (missing[i] === 0) heap.push(i);
  const order: number[] = [];
  const placed = new Uint8Array(n);
  let cycles = 0;
  while (order.length < n) {
    let i = heap.pop();
    if (i === undefined) {
      // A cycle (sequences that contradict each other): place the earliest waiting record anyway.
      cycles++;
      let best = -1;
      for (let j = 0; j < n; j++) if (placed[j] === 0 && (best < 0 || before(j, best) < 0)) best = j;
      i = best;
    }
    if (placed[i] === 1) continue;
    placed[i] = 1;
    order.push(i);
    for (const s of succs[i]!) if (--missing[s]! === 0 && placed[s] === 0) heap.push(s);
  }

  // Vector clocks over the publishers, in that order: clock[i][c] = how many of chain c's records precede or are i.
  const P = chainList.length;
  const sequenced = chainList.reduce((s, c) => s + c.length, 0);
  let clocks: Int32Array | undefined;
  if (P > 0 && n * P <= MAX_CLOCK_ENTRIES && cycles === 0) {
    clocks = new Int32Array(n * P);
    for (const i of order) {
      if (chainOf[i]! < 0) continue;
      const row = i * P;
      for (const p of preds[i]!) {
        if (chainOf[p]! < 0) continue;
        const prow = p * P;
        for (let c = 0; c < P; c++) if (clocks[prow + c]! > clocks[row + c]!) clocks[row + c] = clocks[prow + c]!;
      }
      clocks[row + chainOf[i]!] = posInChain[i]!;
    }
  }
  const hb = (a: number, b: number): boolean => clocks![b * P + chainOf[a]!]! >= posInChain[a]!;
  return {
    order,
    sequenced,
    cycles,
    happenedBefore(a, b) {
      if (clocks === undefined || a === b || chainOf[a]! < 0 || chainOf[b]! < 0) return undefined;
      if (hb(a, b)) return true;
      if (hb(b, a)) return false;
      return undefined;
    },
  };
}

/** A binary min-heap of record indices. */
class MinHeap {
  private readonly items: number[] = [];
  constructor(private readonly less: (a: number, b: number) => number) {}

  push(x: number): void {
    const a = this.items;
    a.push(x);
    let i = a.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (this.less(a[i]!, a[p]!) >= 0) break;
      [a[i], a[p]] = [a[p]!, a[i]!];
      i = p;
    }
  }

  pop(): number | undefined {
    const a = this.items;
    if (a.length === 0) return undefined;
    const top = a[0]!;
    const last = a.pop()!;
    if (a.length > 0) {
      a[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < a.length && this.less(a[l]!, a[m]!) < 0) m = l;
        if (r < a.length && this.less(a[r]!, a[m]!) < 0) m = r;
        if (m === i) break;
        [a[i], a[m]] = [a[m]!, a[i]!];
        i = m;
      }
    }
    return top;
  }
}

import { publisherKey } from "@ioasid/trace";
import type { HistoryRecord } from "./history-catalogue.js";

/** Numbers missing between two records of one publisher that a read holds. */
export interface HistoryGap {
  /** `role/instance/incarnation`. */
  readonly publisher: string;
  /** The `publisher_seq` held before the hole, and the next one held after it. */
  readonly after: number;
  readonly before: number;
}

/**
 * The holes in each publisher's numbering that `records` show: a publisher numbers every record it
 * makes (`publisher_seq`, one process run), so numbers missing between two records it holds are
 * records made and not (yet) stored — sent again by the history outbox after a server's death or a
 * leader election, or lost. Outside the first and last number held nothing is said (a read from a
 * time on starts and ends mid-run). Pure.
 * @example publisherGaps(records) // [{ publisher: "kvm/vm-1/5dae…", after: 3, before: 5 }]: record 4 missing
 */
export function publisherGaps(records: readonly HistoryRecord[]): HistoryGap[] {
  const seqs = new Map<string, number[]>();
  for (const r of records) {
    if (r.publisherSeq === undefined) continue;
    const k = publisherKey(r);
    let list = seqs.get(k);
    if (list === undefined) seqs.set(k, (list = []));
    list.push(r.publisherSeq);
  }
  const out: HistoryGap[] = [];
  for (const [publisher, list] of seqs) {
    list.sort((a, b) => a - b);
    for (let i = 1; i < list.length; i++) if (list[i]! > list[i - 1]! + 1) out.push({ publisher, after: list[i - 1]!, before: list[i]! });
  }
  return out;
}

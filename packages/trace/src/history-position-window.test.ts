import { describe, expect, it } from "vitest";
import { noteReceived, publisherKey, RECEIVED_WINDOW, receivedCursor, takeReceived, type HistoryLink, type ReceivedCursor } from "./history-position.js";

// The received positions kept per publisher (issue 15: a KVM process has a recorder per VM, and each
// of its records scanned every receipt since that recorder's previous one) must name exactly what a
// scan of the receipts names. Its own file: the module's receipts start empty here, so the model
// below sees every receipt the module saw, and the window moves at the same receipts.

/** The scan the per-publisher bookkeeping replaced: every receipt since the cursor, newest per publisher. */
class ScanModel {
  private readonly receipts: HistoryLink[] = [];
  private base = 0;

  note(links: readonly HistoryLink[]): void {
    for (const l of links) this.receipts.push({ ...l });
    if (this.receipts.length - this.base > 2 * RECEIVED_WINDOW) this.base = this.receipts.length - RECEIVED_WINDOW;
  }

  cursor(): ReceivedCursor {
    return { at: this.receipts.length };
  }

  take(cursor: ReceivedCursor): HistoryLink[] {
    const newest = new Map<string, HistoryLink>();
    for (let i = Math.max(cursor.at, this.base); i < this.receipts.length; i++) {
      const l = this.receipts[i]!;
      const had = newest.get(publisherKey(l));
      if (had === undefined || had.publisherSeq < l.publisherSeq) newest.set(publisherKey(l), l);
    }
    cursor.at = this.receipts.length;
    return [...newest.values()].map((l) => ({ ...l }));
  }
}

/** mulberry32: the same steps every run. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

describe("received positions, per publisher", () => {
  it("names what a scan of every receipt since the cursor names, over random receipts, recorders and window moves", () => {
    const model = new ScanModel();
    expect(receivedCursor()).toEqual(model.cursor()); // nothing received before this test
    const rnd = prng(15);
    const pick = (n: number) => Math.floor(rnd() * n);
    // A few publishers whose positions mostly rise (some arrive late: a lower one after a higher
    // one, as gRPC metadata may), a core incarnation that changes, and many recorders (VMs).
    const seqs = new Map<string, number>();
    const link = (): HistoryLink => {
      const role = ["ioasid-core", "vfio", "iommu", "vdcm"][pick(4)]!;
      const instance = role === "vfio" ? `c${pick(3)}` : "0";
      const incarnation = role === "ioasid-core" && rnd() < 0.3 ? "b" : "a";
      const k = `${role}/${instance}/${incarnation}`;
      const next = (seqs.get(k) ?? 0) + 1 + pick(3);
      seqs.set(k, next);
      return { role, instance, incarnation, publisherSeq: rnd() < 0.1 ? Math.max(1, next - 1 - pick(5)) : next };
    };
    const real: ReceivedCursor[] = [receivedCursor()];
    const shadow: ReceivedCursor[] = [model.cursor()];
    let compared = 0;
    let nonEmpty = 0;
    for (let step = 0; step < 40_000; step++) {
      const r = rnd();
      if (r < 0.5) {
        const links = Array.from({ length: 1 + pick(2) }, link);
        noteReceived(links);
        model.note(links);
      } else if (r < 0.52) {
        real.push(receivedCursor());
        shadow.push(model.cursor());
      } else {
        // A recorder that made no record for long (the first, mostly) sees the window move past it.
        const i = rnd() < 0.02 ? 0 : pick(real.length);
        const got = takeReceived(real[i]!);
        expect(got).toEqual(model.take(shadow[i]!));
        expect(real[i]).toEqual(shadow[i]);
        compared++;
        if (got.length > 0) nonEmpty++;
      }
    }
    // The window moved several times (3 × 2 × RECEIVED_WINDOW receipts and more), and most takes named something.
    expect(receivedCursor().at).toBeGreaterThan(6 * RECEIVED_WINDOW);
    expect(compared).toBeGreaterThan(10_000);
    expect(nonEmpty).toBeGreaterThan(compared / 4);
  });
});

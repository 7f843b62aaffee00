/**
 * The subscriber's memory of its recent acknowledgements, by (event sequence, registration): a
 * redelivered event is answered from it without running the handler again (DESIGN §4: delivery
 * is at least once, handling effectively once). The oldest remembered is forgotten first once
 * more than `window` are held; a window of 0 remembers nothing, one of Infinity everything.
 *
 * Keyed by numbers, not by a `"<seq>:<registration>"` string: profiled at 1,000 IOASIDs in flight
 * (issue 15), building and hashing that string for every delivery was most of the subscriber's
 * own time per delivery (the lookup of a fresh string in a map of 100,000). Registrations are few
 * per subscriber, so one map per registration, each keyed by the sequence as a number (exact:
 * sequences stay below 2^53), and the order of forgetting in a ring of the same capacity.
 */
export class AckMemory<T> {
  readonly #window: number;
  readonly #byRegistration = new Map<number, Map<number, T>>();
  /**
   * Insertion order, oldest at #head: (registration, sequence) pairs in two rings that grow by
   * doubling up to the window (a process may hold a subscriber per VM: a thousand of them must
   * not each reserve the whole window). Registration ids are uint32: a Float64Array holds each.
   */
  #ringRegistration = new Float64Array(0);
  #ringSeq = new Float64Array(0);
  #head = 0;
  #size = 0;

  constructor(window: number) {
    if (!((Number.isInteger(window) && window >= 0) || window === Infinity)) {
      throw new RangeError(`the dedupe window must be a whole number ≥ 0 or Infinity (remember every one), not ${window}`);
    }
    this.#window = window;
  }

  /** Acknowledgements held now. */
  get size(): number {
    return this.#size;
  }

  get(seq: number, registrationId: number): T | undefined {
    return this.#byRegistration.get(registrationId)?.get(seq);
  }

  /** Remembers `value`, forgetting the oldest when the window is full. */
  set(seq: number, registrationId: number, value: T): void {
    if (this.#window === 0) return;
    let bySeq = this.#byRegistration.get(registrationId);
    if (bySeq === undefined) this.#byRegistration.set(registrationId, (bySeq = new Map()));
    if (bySeq.has(seq)) {
      bySeq.set(seq, value); // already in the ring: its place in the order stays
      return;
    }
    if (this.#size === this.#window) this.#forgetOldest();
    else if (this.#size === this.#ringSeq.length) this.#grow();
    const capacity = this.#ringSeq.length;
    const at = (this.#head + this.#size) % capacity;
    this.#ringRegistration[at] = registrationId;
    this.#ringSeq[at] = seq;
    this.#size++;
    // The oldest may have been this registration's last: look its map up again.
    let into = this.#byRegistration.get(registrationId);
    if (into === undefined) this.#byRegistration.set(registrationId, (into = bySeq));
    into.set(seq, value);
  }

  /** Doubles the rings (at most to the window), the oldest first again. */
  #grow(): void {
    const capacity = Math.min(this.#window, Math.max(64, this.#ringSeq.length * 2));
    const registrations = new Float64Array(capacity);
    const seqs = new Float64Array(capacity);
    const old = this.#ringSeq.length;
    for (let i = 0; i < this.#size; i++) {
      const from = (this.#head + i) % old;
      registrations[i] = this.#ringRegistration[from]!;
      seqs[i] = this.#ringSeq[from]!;
    }
    this.#ringRegistration = registrations;
    this.#ringSeq = seqs;
    this.#head = 0;
  }

  #forgetOldest(): void {
    const capacity = this.#ringSeq.length;
    const registrationId = this.#ringRegistration[this.#head]!;
    const seq = this.#ringSeq[this.#head]!;
    this.#head = (this.#head + 1) % capacity;
    this.#size--;
    const bySeq = this.#byRegistration.get(registrationId);
    if (bySeq === undefined) return;
    bySeq.delete(seq);
    if (bySeq.size === 0) this.#byRegistration.delete(registrationId);
  }
}

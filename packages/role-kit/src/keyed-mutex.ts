/**
 * Serialises asynchronous work per key, first come first served: work on one key runs one at a
 * time, work on different keys runs concurrently. The IOMMU uses one key per host PASID so that a
 * bind, an unbind and a FREE teardown of the same IOASID never interleave across their core calls
 * (the kernel's pasid_mutex), while different IOASIDs are handled in parallel (DESIGN §4.2); VDCM
 * one per mdev (its MMIO writes and teardown) and one per IOASID set (its registration).
 *
 * @example
 * const locks = new KeyedMutex();
 * await locks.run(`pasid:${hpasid}`, async () => { … });
 */
export class KeyedMutex {
  readonly #tails = new Map<string, Promise<void>>();

  /** Runs `work` once every earlier work on `key` has finished; settles as `work` does. */
  run<T>(key: string, work: () => Promise<T> | T): Promise<T> {
    const previous = this.#tails.get(key) ?? Promise.resolve();
    const result = previous.then(() => work());
    const tail = result.then(
      () => undefined,
      () => undefined,
    );
    this.#tails.set(key, tail);
    void tail.then(() => {
      if (this.#tails.get(key) === tail) this.#tails.delete(key);
    });
    return result;
  }

  /** True when no work on `key` is running or waiting. */
  isIdle(key: string): boolean {
    return !this.#tails.has(key);
  }
}

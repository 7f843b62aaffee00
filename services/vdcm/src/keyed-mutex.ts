/**
 * Mutual exclusion per key: the MMIO writes and the teardown of one mdev, or the registration of
 * one IOASID set, run one at a time while different keys run in parallel. FIFO per key.
 *
 * @example
 * const locks = new KeyedMutex();
 * await locks.run(`mdev:${uuid}`, async () => { … });
 */
export class KeyedMutex {
  private readonly tails = new Map<string, Promise<void>>();

  /** Runs `fn` once every earlier holder of `key` has finished; resolves or rejects with it. */
  async run<T>(key: string, fn: () => Promise<T> | T): Promise<T> {
    const previous = this.tails.get(key) ?? Promise.resolve();
    let release!: () => void;
    const mine = new Promise<void>((resolve) => (release = resolve));
    const tail = previous.then(() => mine);
    this.tails.set(key, tail);
    try {
      await previous;
      return await fn();
    } finally {
      release();
      // The last holder removes the key, so the map only holds keys in use.
      if (this.tails.get(key) === tail) this.tails.delete(key);
    }
  }

  /** Keys held or waited for (for tests and diagnostics). */
  get size(): number {
    return this.tails.size;
  }
}

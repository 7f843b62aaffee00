import { IoasidSpace, coreError, type Allocation, type CustomAllocator } from "@ioasid/ioasid";
import { EventLog, type EventLogOptions } from "./event-log.js";

/**
 * An external allocator as the core sees it: asynchronous (it lives in another process). The
 * transport supplies the implementation (a gRPC AllocatorService client).
 */
export interface ExternalAllocator {
  readonly name: string;
  /** An IOASID in [min, max], or 0 when it has none. */
  allocate(min: number, max: number): Promise<number>;
  /** Tells the allocator an IOASID it gave is reclaimed (fire and forget). */
  release(ioasid: number): void;
  /** Drops the connection. */
  close(): void;
}

/** Options of {@link IoasidCore}. */
export interface IoasidCoreOptions extends EventLogOptions {
  /** Size of the IOASID namespace. @default 2^20 */
  readonly capacity?: number;
}

/**
 * The IOASID core of one host: the domain model ({@link IoasidSpace}), its log of committed events,
 * and the bridge that lets an asynchronous external allocator feed the synchronous model.
 */
export class IoasidCore {
  readonly space: IoasidSpace;
  readonly log: EventLog;
  private external: ExternalAllocator | undefined;
  /** The answer of the external allocator for the allocation being committed right now. */
  private stashed: number | undefined;

  constructor(options: IoasidCoreOptions = {}) {
    this.log = new EventLog(options);
    this.space = new IoasidSpace({
      ...(options.capacity === undefined ? {} : { capacity: options.capacity }),
      onEvent: (e) => this.log.append(e),
    });
  }

  /** Name of the external allocator in force, if any. */
  get externalAllocator(): string | undefined {
    return this.external?.name;
  }

  /**
   * Registers an external allocator. The model sees a synchronous {@link CustomAllocator} that
   * hands out whatever the external allocator answered just before the model was called: the
   * remote call is awaited first, then the model runs with no await in between, so concurrent
   * allocations cannot take each other's answer.
   */
  registerExternalAllocator(external: ExternalAllocator): void {
    const bridge: CustomAllocator = {
      name: external.name,
      alloc: () => {
        const id = this.stashed;
        this.stashed = undefined;
        return id;
      },
      free: (id) => external.release(id),
    };
    this.space.registerAllocator(bridge);
    this.external = external;
  }

  /** Returns to the default allocator. */
  unregisterExternalAllocator(name: string): void {
    this.space.unregisterAllocator(name);
    this.external?.close();
    this.external = undefined;
  }

  /** Allocates one IOASID, through the external allocator when one is registered. */
  async alloc(setId: number, options: { min?: number; max?: number; privateData?: Uint8Array }): Promise<Allocation> {
    const external = this.external;
    if (external === undefined) return this.space.alloc(setId, options);
    const min = options.min ?? 1;
    const max = options.max ?? this.space.capacity - 1;
    // Check the set before asking the remote allocator; the model checks the rest.
    if (!this.space.listSets().some((s) => s.id === setId)) throw coreError("SET_UNKNOWN", `no IOASID set ${setId}`);
    let answer: number;
    try {
      answer = await external.allocate(min, max);
    } catch (err) {
      throw coreError("ALLOCATOR_FAILED", `allocator ${external.name} did not answer: ${(err as Error).message}`);
    }
    if (this.external !== external) {
      if (answer !== 0) external.release(answer);
      throw coreError("ALLOCATOR_FAILED", `allocator ${external.name} was unregistered during the allocation`);
    }
    this.stashed = answer === 0 ? undefined : answer;
    try {
      return this.space.alloc(setId, options);
    } finally {
      // The model refused before consuming the answer: give the ID back.
      if (this.stashed !== undefined) external.release(this.stashed);
      this.stashed = undefined;
    }
  }

  /** Allocates `count` IOASIDs, all or nothing. */
  async allocMany(setId: number, count: number, options: { min?: number; max?: number }): Promise<Allocation[]> {
    if (this.external === undefined) return this.space.allocMany(setId, count, options);
    if (!Number.isInteger(count) || count < 1 || count > 65_536) {
      throw coreError("COUNT_INVALID", `count ${count} is outside 1..65536`);
    }
    const set = this.space.listSets().find((s) => s.id === setId);
    if (set === undefined) throw coreError("SET_UNKNOWN", `no IOASID set ${setId}`);
    if (set.inUse + count > set.quota) {
      throw coreError("SET_QUOTA_EXCEEDED", `set ${setId} has ${set.quota - set.inUse} of its quota of ${set.quota} left; ${count} asked`);
    }
    const done: Allocation[] = [];
    try {
      for (let i = 0; i < count; i++) done.push(await this.alloc(setId, options));
    } catch (err) {
      for (const a of done) this.space.free(setId, a.ioasid, a.generation);
      throw err;
    }
    return done;
  }

  /** Releases the external allocator's connection. */
  close(): void {
    this.external?.close();
  }
}

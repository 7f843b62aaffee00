import { jetstream, jetstreamManager, AckPolicy, DeliverPolicy, DiscardPolicy, RetentionPolicy, StorageType } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { DEFAULT_PREFIX, encodeToken } from "./subjects.js";

// A role's own state (its modelled hardware: VMCS tables, device PASID entries, IOMMU PASID tables)
// kept in JetStream so it survives kill -9 of the role (DESIGN §4.6 for the core; issue 6 for the
// roles). One stream per prefix; each role instance writes one subject per entry and only the last
// message of a subject is kept (max_msgs_per_subject 1): a key-value store on plain JetStream, with
// an empty payload meaning "deleted".

/** One change of a role's state: `value` undefined deletes the key. */
export interface StateChange {
  readonly key: string;
  readonly value: unknown;
}

/** Where a role writes its state (tests pass an in-memory one). */
export interface RoleStatePort {
  /** Writes the changes, in order, and resolves once the server stored every one of them. */
  write(changes: readonly StateChange[]): Promise<void>;
}

/** The JetStream stream of every role's state under a prefix. */
export function roleStateStreamName(prefix: string): string {
  return `${prefix.replace(/[^A-Za-z0-9_-]/g, "_").toUpperCase()}_ROLESTATE`;
}

/** Subject of one key of a role instance's state. */
export function roleStateSubject(prefix: string, role: string, instance: string, key: string): string {
  return `${roleStatePrefix(prefix, role, instance)}.${encodeToken(key)}`;
}

function roleStatePrefix(prefix: string, role: string, instance: string): string {
  return `${prefix}.rolestate.${encodeToken(role)}.${encodeToken(instance)}`;
}

/**
 * The state of one role instance in JetStream.
 *
 * @example
 * const store = await openRoleState(nc, { role: "vdcm", instance: "vdcm0" });
 * const saved = await store.load();          // key → value, as last written
 * await store.write([{ key: "entry/dsa0/1", value: { hpasid: 201 } }]);
 */
export class RoleState implements RoleStatePort {
  private constructor(
    private readonly nc: NatsConnection,
    private readonly prefix: string,
    private readonly role: string,
    private readonly instance: string,
  ) {}

  /** Opens (creating the stream when missing) the state of `role`/`instance`. */
  static async open(nc: NatsConnection, options: { role: string; instance: string; prefix?: string; replicas?: number }): Promise<RoleState> {
    const prefix = options.prefix ?? DEFAULT_PREFIX;
    const jsm = await jetstreamManager(nc);
    const name = roleStateStreamName(prefix);
    try {
      await jsm.streams.info(name);
    } catch {
      try {
        await jsm.streams.add({
          name,
          subjects: [`${prefix}.rolestate.>`],
          storage: StorageType.File,
          retention: RetentionPolicy.Limits,
          discard: DiscardPolicy.Old,
          max_msgs_per_subject: 1,
          num_replicas: options.replicas ?? 1,
        });
      } catch (err) {
        // Another role created it meanwhile.
        await jsm.streams.info(name).catch(() => {
          throw err;
        });
      }
    }
    return new RoleState(nc, prefix, options.role, options.instance);
  }

  /** Every key of this instance with its last value (deleted keys left out). */
  async load(): Promise<Map<string, unknown>> {
    const out = new Map<string, unknown>();
    const name = roleStateStreamName(this.prefix);
    const jsm = await jetstreamManager(this.nc);
    const filter = `${roleStatePrefix(this.prefix, this.role, this.instance)}.>`;
    const info = await jsm.streams.info(name, { subjects_filter: filter });
    if (Object.keys(info.state.subjects ?? {}).length === 0) return out;
    const js = jetstream(this.nc);
    // An ephemeral consumer of the last message of each subject (one filter: nats-server 2.9 has no
    // filter_subjects), read to its end.
    const ci = await jsm.consumers.add(name, {
      filter_subject: filter,
      deliver_policy: DeliverPolicy.LastPerSubject,
      ack_policy: AckPolicy.None,
      inactive_threshold: 30_000_000_000,
      mem_storage: true,
    });
    try {
      const consumer = await js.consumers.get(name, ci.name);
      let pending = ci.num_pending;
      while (pending > 0) {
        const batch = await consumer.fetch({ max_messages: Math.min(pending, 1000), expires: 2000 });
        let got = 0;
        for await (const m of batch) {
          got++;
          pending = m.info.pending;
          if (m.data.length > 0) {
            const { key, value } = JSON.parse(m.string()) as { key: string; value: unknown };
            out.set(key, value);
          }
        }
        if (got === 0) throw new Error(`role state of ${this.role}/${this.instance}: the stream stopped answering with ${pending} left`);
      }
    } finally {
      await jsm.consumers.delete(name, ci.name).catch(() => undefined);
    }
    return out;
  }

  /** @see RoleStatePort.write */
  async write(changes: readonly StateChange[]): Promise<void> {
    if (changes.length === 0) return;
    const js = jetstream(this.nc);
    // Published in order (one connection keeps it); acknowledged together.
    await Promise.all(
      changes.map((c) =>
        js.publish(roleStateSubject(this.prefix, this.role, this.instance, c.key), c.value === undefined ? new Uint8Array() : JSON.stringify({ key: c.key, value: c.value })),
      ),
    );
  }

  /** Deletes every key of this instance (a role told to start from nothing). */
  async clear(): Promise<void> {
    const jsm = await jetstreamManager(this.nc);
    await jsm.streams.purge(roleStateStreamName(this.prefix), { filter: `${roleStatePrefix(this.prefix, this.role, this.instance)}.>` });
  }
}

/**
 * A store whose failed write stops the process: the role's tables in memory are then ahead of what
 * it kept, and going on would let a later crash bring back a state the role already told others was
 * gone (found by the chaos soak: an IOMMU entry torn down in memory, its deletion's write failed,
 * then a restart restored the entry after its IOASID was reclaimed). A restart restores the kept
 * tables and reconciles them with the core, as after any crash (the core's operation log does the
 * same: fail-stop). While `stopping` says the role is already shutting down, the error is passed
 * to the caller instead.
 */
export function failStopOnWriteError(store: RoleStatePort, onFatal: (err: unknown) => void, options: { stopping?: () => boolean } = {}): RoleStatePort {
  return {
    write: (changes) =>
      store.write(changes).catch((err: unknown) => {
        // A role already stopping on a signal is not stopped again: the write's caller gets the
        // error (its teardown goes on), and the next start reconciles from what was kept.
        if (options.stopping?.() === true) throw err;
        onFatal(err);
        // The process is going: nothing that waited for this write may go on as if it were kept.
        return new Promise<never>(() => undefined);
      }),
  };
}

/** A {@link RoleStatePort} in memory (tests): the last value of every key, in `saved`. */
export class MemoryRoleState implements RoleStatePort {
  readonly saved = new Map<string, unknown>();

  async write(changes: readonly StateChange[]): Promise<void> {
    for (const c of changes) {
      if (c.value === undefined) this.saved.delete(c.key);
      else this.saved.set(c.key, structuredClone(c.value));
    }
  }
}

#!/usr/bin/env node
/**
 * Deliberately broken IOASID cores for the conformance kit's mutation test (issue 13, DESIGN §12):
 * our core, composed as services/ioasid-core/src/main.ts composes it, with one wrapper around one
 * of its parts — the model (IoasidSpace), the delivery engine, or the operation log — chosen by
 * IOASID_MUTANT. Test-only: never a mode of the real service. Each mutant must fail the clause it
 * breaks (test/conform/core-conform.test.ts says which).
 */
import { DeliveryEngine, type Chain, type DeliveryEngineOptions } from "@ioasid/bus";
import { isDomainError } from "@ioasid/errors";
import { configOrExit, createLogger, holdSignals, runUntilSignal } from "@ioasid/grpc-kit";
import {
  assertHolder,
  EventType,
  IoasidSpace,
  IoasidState,
  toHolderKey,
  type Allocation,
  type FreeResult,
  type Holder,
  type IoasidSpaceOptions,
} from "@ioasid/ioasid";
import { coreConfigSchema, startCoreServer } from "@ioasid/ioasid-core";
import { connectNats } from "@ioasid/role-kit";
import { jetstreamManager } from "@nats-io/jetstream";

/** The broken variants. */
export const CORE_MUTANTS = [
  /** Sends an event to every tier at once: a lower tier receives before the higher ones acknowledged. */
  "tier-order-ignored",
  /** Applies acknowledgements but drops the releases they carry. */
  "ignores-releases",
  /** A Free naming another set frees the IOASID in its own set. */
  "free-other-set",
  /** DetachSpid of a FREE_PENDING IOASID emits UNBIND all the same. */
  "unbind-on-free-pending",
  /** Get takes a reference on a FREE_PENDING IOASID. */
  "get-in-free-pending",
  /** Alloc in a range with no free ID takes a FREE_PENDING one back from its holders (reused while referenced). */
  "reuse-while-referenced",
  /** Never sends a missed delivery again: hellos are ignored and nothing is retried. */
  "no-backlog",
  /** Comes back from a restart with nothing: deletes its operation log at start. */
  "forgets-state",
] as const;
export type CoreMutant = (typeof CORE_MUTANTS)[number];

const mutant = process.env["IOASID_MUTANT"] as CoreMutant | undefined;
if (mutant === undefined || !CORE_MUTANTS.includes(mutant)) {
  process.stderr.write(`IOASID_MUTANT must be one of ${CORE_MUTANTS.join(", ")}\n`);
  process.exit(2);
}

/** The model's TS-private parts a broken variant reaches into (present at run time). */
interface SpaceInternals {
  readonly sets: Map<number, unknown>;
  readonly gen: Uint32Array;
  readonly refs: Uint32Array;
  emit(type: EventType, ioasid: number, set: unknown, generation: number, spid: number, privateData: Uint8Array | undefined, refcount: number): void;
  resolve(setId: number, ioasid: number, generation: number): unknown;
  addRef(ioasid: number, key: string): number;
  reclaim(ioasid: number): void;
  dataOf(ioasid: number): Uint8Array | undefined;
}

const internals = (space: IoasidSpace): SpaceInternals => space as unknown as SpaceInternals;

/** free-other-set: ownership is not checked on Free. */
class FreesOtherSets extends IoasidSpace {
  override free(setId: number, ioasid: number, generation = 0): FreeResult {
    try {
      return super.free(setId, ioasid, generation);
    } catch (err) {
      if (!isDomainError(err, "IOASID_NOT_IN_SET")) throw err;
      return super.free(this.describe(ioasid)!.setId, ioasid, generation);
    }
  }
}

/** unbind-on-free-pending: the FREE does not cover the SPID's detach. */
class UnbindsFreePending extends IoasidSpace {
  override detachSpid(setId: number, ioasid: number, generation = 0): { spid: number; unbindEmitted: boolean } {
    const r = super.detachSpid(setId, ioasid, generation);
    if (r.unbindEmitted) return r;
    const i = internals(this);
    i.emit(EventType.UNBIND, ioasid, i.sets.get(setId), i.gen[ioasid]!, r.spid, i.dataOf(ioasid), i.refs[ioasid]!);
    return { spid: r.spid, unbindEmitted: true };
  }
}

/** get-in-free-pending: Get skips the FREE_PENDING refusal (S2 broken). */
class GetsInFreePending extends IoasidSpace {
  override get(setId: number, ioasid: number, holder: Holder, generation = 0): { refcount: number } {
    if (this.describe(ioasid)?.state !== IoasidState.FREE_PENDING) return super.get(setId, ioasid, holder, generation);
    assertHolder(holder);
    internals(this).resolve(setId, ioasid, generation);
    return { refcount: internals(this).addRef(ioasid, toHolderKey(holder)) };
  }
}

/**
 * reuse-while-referenced: when the range has no free ID, a FREE_PENDING one is taken back from its
 * holders and handed out again (S1 broken; only where the default allocator finds nothing).
 */
class ReusesReferenced extends IoasidSpace {
  override alloc(setId: number, options: { min?: number; max?: number; privateData?: Uint8Array } = {}): Allocation {
    try {
      return super.alloc(setId, options);
    } catch (err) {
      if (!isDomainError(err, "IOASID_RANGE_EXHAUSTED")) throw err;
      const [lo, hi] = [options.min ?? 1, options.max ?? this.capacity - 1];
      const pending = this.listIoasids().find((i) => i.state === IoasidState.FREE_PENDING && i.ioasid >= lo && i.ioasid <= hi);
      if (pending === undefined) throw err;
      internals(this).refs[pending.ioasid] = 0;
      internals(this).reclaim(pending.ioasid);
      return super.alloc(setId, options);
    }
  }
}

/** tier-order-ignored: every target of a chain at one priority, so all run in parallel. */
class IgnoresTierOrder extends DeliveryEngine {
  override submit(chain: Chain): void {
    super.submit({ ...chain, targets: chain.targets.map((t) => ({ ...t, priority: 0 })) });
  }
}

/** no-backlog: no hello subscription and no retry timer, so a backlog is never sent. */
class DropsBacklog extends DeliveryEngine {
  override start(): void {}
}

const SPACES: Partial<Record<CoreMutant, new (o: IoasidSpaceOptions) => IoasidSpace>> = {
  "free-other-set": FreesOtherSets,
  "unbind-on-free-pending": UnbindsFreePending,
  "get-in-free-pending": GetsInFreePending,
  "reuse-while-referenced": ReusesReferenced,
};

function deliveryEngine(o: DeliveryEngineOptions): DeliveryEngine {
  switch (mutant) {
    case "tier-order-ignored":
      return new IgnoresTierOrder(o);
    case "no-backlog":
      return new DropsBacklog(o);
    case "ignores-releases":
      return new DeliveryEngine({ ...o, onAcks: (acks) => o.onAcks(acks.map((a) => ({ ...a, releases: [], detachSpid: false }))) });
    default:
      return new DeliveryEngine(o);
  }
}

const config = configOrExit(coreConfigSchema, { service: "ioasid-core" });
const logger = createLogger("ioasid-core", { level: config.logLevel });
const held = holdSignals();
const nc = await connectNats(config.natsUrl, { name: "ioasid-core", timeoutMs: config.natsConnectTimeout, logger });
if (mutant === "forgets-state") {
  const jsm = await jetstreamManager(nc);
  await jsm.streams.delete(config.stream).catch(() => false);
}
const Space = SPACES[mutant];
const running = await startCoreServer({
  host: config.address.host,
  port: config.address.port,
  capacity: config.capacity,
  eventLogRetain: config.eventLogRetain,
  logger,
  nats: { nc, prefix: config.prefix, stream: config.stream, replicas: config.replicas, deadlineMs: config.deadlineMs, retryMs: config.retryMs },
  onFatal: () => process.exit(1),
  ...(Space === undefined ? {} : { space: (o: IoasidSpaceOptions) => new Space(o) }),
  deliveryEngine,
});
runUntilSignal(running.server, {
  logger,
  beforeExit: async () => {
    await running.engine?.stop();
    await running.opLog?.drain();
    running.core.close();
    await nc.drain();
  },
});
held.release();

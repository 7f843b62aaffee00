import type { HistoryActionCase } from "@ioasid/bus";
import { Code, DomainError } from "@ioasid/errors";
import { EventType, TokenType, type Holder, type IoasidEvent } from "@ioasid/ioasid";
import { InProcessCore } from "@ioasid/testkit";
import { beforeEach, expect } from "vitest";
import { KVM_SUBSCRIBER, VMCS_PURPOSE } from "./holder-reference.js";
import { KvmEventType, type KvmEvent, type KvmEventHandler, type NotifierPort } from "./kvm-event.js";
import type { HistorySink, KvmHistoryAction } from "./kvm-history.js";
import type { KvmOptions } from "./kvm-options.js";
import { Kvm } from "./kvm.js";

// The KVM domain against the real core model (the testkit's InProcessCore) and in-memory fakes of
// the bus and the history: the test makes the core commit events (as VFIO and the IOMMU would) and
// delivers them to KVM's handlers by hand. The same rules run against the core service and NATS in
// test/integration/kvm.test.ts.
// Shared by the KVM unit tests (kvm*.test.ts, adapters/kvm-kept-state.test.ts); each calls
// useKvmFixture() for a fresh core, bus and history per test.

export const unavailable = () => new DomainError(Code.UNAVAILABLE, "UNAVAILABLE", "core unreachable");

/** The bus: one handler per VM instance; the test delivers events by hand. */
export class FakeNotifier implements NotifierPort {
  handlers = new Map<string, KvmEventHandler>();
  stopped: string[] = [];
  async subscribe(instance: string, handler: KvmEventHandler) {
    this.handlers.set(instance, handler);
    return {
      stop: async () => {
        this.handlers.delete(instance);
        this.stopped.push(instance);
      },
    };
  }
  deliver(instance: string, e: KvmEvent, attempt = 1) {
    const handler = this.handlers.get(instance);
    if (handler === undefined) throw new Error(`no subscriber ${instance}`);
    return handler(e, attempt);
  }
}

export let core: InProcessCore;
export let bus: FakeNotifier;
export let history: Array<{ instance: string; action: HistoryActionCase; step: KvmHistoryAction; fields: Parameters<HistorySink["record"]>[1] }>;

export function newKvm(options: Partial<KvmOptions> = {}): Kvm {
  return new Kvm({
    core,
    notifier: bus,
    history: (instance) => ({ record: (step, fields) => history.push({ instance, action: step.$case, step, fields }) }),
    ...options,
  });
}

/** The VM's set, as VFIO creates it (token type MM, the VM's MM token). @returns its id */
export const createSet = (mmToken: bigint): number => core.space.createSet({ token: { type: TokenType.MM, value: mmToken }, quota: 64 }).id;

/** KVM's holder of a VM's VMCS reference. */
export const vmcs = (instance: string): Holder => ({ role: KVM_SUBSCRIBER, instance, purpose: VMCS_PURPOSE });

/** A core event as KVM's subscriber gets it. */
export function toKvm(e: IoasidEvent): KvmEvent {
  const type =
    e.type === EventType.BIND
      ? KvmEventType.BIND
      : e.type === EventType.UNBIND
        ? KvmEventType.UNBIND
        : e.type === EventType.FREE
          ? KvmEventType.FREE
          : KvmEventType.OTHER;
  return { seq: BigInt(e.seq), type, ioasid: e.ioasid, generation: e.generation, spid: e.spid, setId: e.setId };
}

/** The last event of that type the core committed for the IOASID. */
export function committed(type: EventType, ioasid: number): KvmEvent {
  const e = core.events.findLast((x) => x.type === type && x.ioasid === ioasid);
  if (e === undefined) throw new Error(`the core committed no ${type} of IOASID ${ioasid}`);
  return toKvm(e);
}

/** The set the VM's registration is attached to (the VM's set must exist). */
export function setOf(instance: string): number {
  const r = core.space.listRegistrations().find((x) => x.subscriber.name === KVM_SUBSCRIBER && x.subscriber.instance === instance);
  if (r === undefined || r.setId === 0) throw new Error(`${instance} has no active registration`);
  return r.setId;
}

/** Makes the core bind `spid` to `ioasid` in the VM's set (allocating it first if it is not): commits BIND. */
export function attach(instance: string, ioasid: number, spid: number): KvmEvent {
  const setId = setOf(instance);
  if (core.space.describe(ioasid) === undefined) core.space.alloc(setId, { min: ioasid, max: ioasid });
  core.space.attachSpid(setId, ioasid, spid);
  return committed(EventType.BIND, ioasid);
}

/** The core commits BIND of `spid` → `ioasid` and KVM gets it. */
export const bind = (instance: string, ioasid: number, spid: number) => bus.deliver(instance, attach(instance, ioasid, spid));

/** The core detaches the IOASID's SPID (commits UNBIND) and KVM gets it. */
export function unbind(instance: string, ioasid: number): ReturnType<FakeNotifier["deliver"]> {
  core.space.detachSpid(core.space.describe(ioasid)!.setId, ioasid);
  return bus.deliver(instance, committed(EventType.UNBIND, ioasid));
}

/** The guest frees the IOASID (FREE_PENDING while referenced: commits FREE) and KVM gets the FREE. */
export function free(instance: string, ioasid: number): ReturnType<FakeNotifier["deliver"]> {
  core.space.free(core.space.describe(ioasid)!.setId, ioasid);
  return bus.deliver(instance, committed(EventType.FREE, ioasid));
}

/** References `kvm/<instance>/vmcs` holds on the IOASID at that generation. */
export function held(ioasid: number, generation: number, instance: string): number {
  const info = core.space.describe(ioasid);
  if (info === undefined || info.generation !== generation) return 0;
  return info.holders.find((h) => h.holder.role === KVM_SUBSCRIBER && h.holder.instance === instance && h.holder.purpose === VMCS_PURPOSE)?.count ?? 0;
}

/** Every reference a `kvm/*` holder has, in every set. */
export const kvmReferences = (): number =>
  core.space
    .listIoasids()
    .flatMap((i) => i.holders)
    .filter((h) => h.holder.role === KVM_SUBSCRIBER)
    .reduce((n, h) => n + h.count, 0);

export const kvmRegistrations = () => core.space.listRegistrations().filter((r) => r.subscriber.name === KVM_SUBSCRIBER);

/** The reason the core refuses `fn` with. */
export function refusalOf(fn: () => unknown): string | undefined {
  try {
    fn();
    return undefined;
  } catch (err) {
    return (err as DomainError).reason;
  }
}

export async function expectRefused(p: Promise<unknown> | (() => unknown), code: Code, reason: string): Promise<DomainError> {
  let err: unknown;
  try {
    await (typeof p === "function" ? p() : p);
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(DomainError);
  expect({ code: (err as DomainError).code, reason: (err as DomainError).reason }).toEqual({ code, reason });
  return err as DomainError;
}

/** Empties the recorded history (the fixture's `history` is read-only to importers). */
export function clearHistory(): void {
  history = [];
}

/** A fresh core, bus and history before each test of the calling file. */
export function useKvmFixture(): void {
  beforeEach(() => {
    core = new InProcessCore();
    bus = new FakeNotifier();
    history = [];
  });
}

import { Code, DomainError } from "@ioasid/errors";
import { IoasidSpace, type IoasidEvent, type IoasidSpaceOptions } from "@ioasid/ioasid";
import type { CorePort, CorePortCall } from "@ioasid/role-kit";

/** Options of {@link InProcessCore}. */
export interface InProcessCoreOptions {
  /** Size of the namespace. @default 2^20 */
  readonly capacity?: IoasidSpaceOptions["capacity"];
}

/**
 * The IOASID core for a role's unit tests: the real domain model (`IoasidSpace`, the one the core
 * service runs) behind the roles' {@link CorePort}, in the test's process — so a unit test meets
 * the core's own rules and refusals (generations, FREE_PENDING, named holders, SPIDs, pending MM
 * registrations), not a hand-written imitation of them. What the service adds (the operation log,
 * delivery over NATS) is the integration tests' business.
 *
 * For the paths a role must survive, a test can make the next call of a kind fail
 * ({@link failNext}) or be applied with its answer lost ({@link loseAnswerOf}: the call happened
 * at the core, the role saw UNAVAILABLE). Every committed event is kept in {@link events}, for the
 * test to deliver to the role's handler.
 *
 * @example
 * const core = new InProcessCore();
 * const { id: setId } = core.space.createSet({ token: { type: TokenType.MM, value: 42n } });
 * const kvm = new Kvm({ core, ... });
 */
export class InProcessCore implements CorePort {
  /** The model: tests may set it up directly (as VFIO would) and inspect it. */
  readonly space: IoasidSpace;
  /** Every event the model committed, in sequence order. */
  readonly events: IoasidEvent[] = [];
  /** The calls made through the port, in order (by name). */
  readonly calls: CorePortCall[] = [];
  /** The calls made through the port, in order, with their arguments (as {@link calls}). */
  readonly requests: Array<{ readonly call: CorePortCall; readonly args: readonly unknown[] }> = [];
  /** While true, every call fails UNAVAILABLE before it reaches the model (the core is down). */
  unreachable = false;
  readonly #failNext = new Map<CorePortCall, DomainError[]>();
  readonly #loseAnswer = new Map<CorePortCall, DomainError[]>();
  readonly #holdAnswer = new Map<CorePortCall, Promise<unknown>[]>();
  readonly #listeners = new Set<(event: IoasidEvent) => void>();

  constructor(options: InProcessCoreOptions = {}) {
    this.space = new IoasidSpace({
      capacity: options.capacity,
      onEvent: (e) => {
        this.events.push(e);
        // Delivered after the change that committed it, as a subscriber gets it (never from inside
        // the model's own mutation, which a listener calling back into `space` would re-enter).
        for (const listener of this.#listeners) queueMicrotask(() => listener(e));
      },
    });
  }

  /**
   * Calls `listener` with every event committed from now on, in sequence order, a microtask after
   * the change that committed it: a stand-in for another tier that reacts to the events (e.g. the
   * IOMMU's FREE teardown dropping its references through {@link space}).
   * @returns a function that stops the calls
   */
  subscribe(listener: (event: IoasidEvent) => void): () => void {
    this.#listeners.add(listener);
    return () => void this.#listeners.delete(listener);
  }

  /**
   * Makes the next call of `call` fail with `err` before it reaches the model (nothing changes).
   * Several queued failures apply to successive calls.
   * @default err UNAVAILABLE `UNAVAILABLE`
   */
  failNext(call: CorePortCall, err: DomainError = new DomainError(Code.UNAVAILABLE, "UNAVAILABLE", "the core is unreachable (injected)")): void {
    const queue = this.#failNext.get(call) ?? [];
    queue.push(err);
    this.#failNext.set(call, queue);
  }

  /**
   * Applies the next `times` calls of `call`, then answers each with `err`: the answer was lost.
   * @default err UNAVAILABLE `UNAVAILABLE` (DEADLINE_EXCEEDED is the other way a role sees it)
   */
  loseAnswerOf(call: CorePortCall, times = 1, err?: DomainError): void {
    const queue = this.#loseAnswer.get(call) ?? [];
    for (let i = 0; i < times; i++) {
      queue.push(err ?? new DomainError(Code.UNAVAILABLE, "UNAVAILABLE", `the answer to ${call} was lost (injected): the core applied it`));
    }
    this.#loseAnswer.set(call, queue);
  }

  /**
   * Applies the next call of `call` at once but answers it only once `until` settles: a slow reply
   * (the core took the reference; the role has not heard yet).
   */
  holdAnswerOf(call: CorePortCall, until: Promise<unknown>): void {
    const queue = this.#holdAnswer.get(call) ?? [];
    queue.push(until);
    this.#holdAnswer.set(call, queue);
  }

  /** Events committed after sequence `afterSeq`, optionally of one IOASID. */
  eventsAfter(afterSeq: number, ioasid?: number): IoasidEvent[] {
    return this.events.filter((e) => e.seq > afterSeq && (ioasid === undefined || e.ioasid === ioasid));
  }

  /**
   * Runs one port call against the model: asynchronous like the real port (the caller never sees
   * the answer in the same turn), with the injected failures.
   */
  async #call<T>(call: CorePortCall, args: readonly unknown[], apply: () => T): Promise<T> {
    await Promise.resolve();
    this.calls.push(call);
    this.requests.push({ call, args });
    if (this.unreachable) throw new DomainError(Code.UNAVAILABLE, "UNAVAILABLE", "the core is unreachable (injected)");
    const failure = this.#failNext.get(call)?.shift();
    if (failure !== undefined) throw failure;
    const result = apply();
    const lost = this.#loseAnswer.get(call)?.shift();
    if (lost !== undefined) throw lost;
    const hold = this.#holdAnswer.get(call)?.shift();
    if (hold !== undefined) await hold;
    return result;
  }

  createSet: CorePort["createSet"] = (token, quota) => this.#call("createSet", [token, quota], () => this.space.createSet({ token, quota }));
  getSet: CorePort["getSet"] = (setId) => this.#call("getSet", [setId], () => this.space.getSet(setId));
  listSets: CorePort["listSets"] = () => this.#call("listSets", [], () => this.space.listSets());
  destroySet: CorePort["destroySet"] = (setId) => this.#call("destroySet", [setId], () => this.space.destroySet(setId));
  freeSet: CorePort["freeSet"] = (setId) => this.#call("freeSet", [setId], () => this.space.freeSet(setId));
  alloc: CorePort["alloc"] = (setId, options) => this.#call("alloc", [setId, options], () => this.space.alloc(setId, { ...options }));
  free: CorePort["free"] = (setId, ioasid, generation) => this.#call("free", [setId, ioasid, generation], () => this.space.free(setId, ioasid, generation));
  find: CorePort["find"] = (setId, ioasid, generation) => this.#call("find", [setId, ioasid, generation], () => this.space.find(setId, ioasid, generation));
  findBySpid: CorePort["findBySpid"] = (setId, spid, holder) =>
    this.#call("findBySpid", [setId, spid, holder], () => this.space.findBySpid(setId, spid, holder));
  get: CorePort["get"] = (setId, ioasid, holder, generation) =>
    this.#call("get", [setId, ioasid, holder, generation], () => this.space.get(setId, ioasid, holder, generation));
  put: CorePort["put"] = (setId, ioasid, holder, generation) =>
    this.#call("put", [setId, ioasid, holder, generation], () => this.space.put(setId, ioasid, holder, generation));
  attachSpid: CorePort["attachSpid"] = (setId, ioasid, spid, generation) =>
    this.#call("attachSpid", [setId, ioasid, spid, generation], () => this.space.attachSpid(setId, ioasid, spid, generation));
  detachSpid: CorePort["detachSpid"] = (setId, ioasid, generation) =>
    this.#call("detachSpid", [setId, ioasid, generation], () => this.space.detachSpid(setId, ioasid, generation));
  describe: CorePort["describe"] = (ioasid) => this.#call("describe", [ioasid], () => this.space.describe(ioasid));
  listIoasids: CorePort["listIoasids"] = (setId) => this.#call("listIoasids", [setId], () => this.space.listIoasids(setId));
  register: CorePort["register"] = (options) => this.#call("register", [options], () => this.space.register(options));
  unregister: CorePort["unregister"] = (registrationId) => this.#call("unregister", [registrationId], () => this.space.unregister(registrationId));
  listRegistrations: CorePort["listRegistrations"] = () => this.#call("listRegistrations", [], () => this.space.listRegistrations());
}

import { Code, DomainError } from "@ioasid/errors";
import { core, events } from "@ioasid/proto";
import type { IommuCorePort } from "./iommu-driver.js";

// A small in-memory stand-in for ioasid-core, for the driver's unit tests only (the integration
// tests use the real core): sets, IOASIDs with generations, named references, SPIDs, and the
// BIND/UNBIND/FREE events those emit, with the core's refusals for the cases the driver meets.

interface FakeIoasid {
  readonly ioasid: number;
  readonly setId: number;
  readonly generation: number;
  state: "ACTIVE" | "FREE_PENDING";
  spid: number;
  readonly holders: Map<string, number>;
}

const err = (code: number, reason: string) => new DomainError(code as Code, reason, reason);
const key = (h: core.Holder | undefined) => `${h?.role}/${h?.instance}/${h?.purpose}`;

/** The fake core: implements the {@link IommuCorePort} calls; `events` lists what it emitted. */
export class FakeCore implements IommuCorePort {
  readonly events: { type: "BIND" | "UNBIND" | "FREE" | "RECLAIM"; ioasid: number; generation: number; spid: number; setId: number; seq: bigint }[] = [];
  readonly calls: string[] = [];
  /** Makes the next call of this name fail with this error. */
  failNext = new Map<string, DomainError>();
  /** Applies the next call of this name, then loses its answer (UNAVAILABLE). */
  loseAnswerOf = new Set<string>();
  readonly #sets = new Map<number, { token: bigint; type: events.TokenType; quota: number }>();
  readonly #ioasids = new Map<number, FakeIoasid>();
  readonly #generations = new Map<number, number>();
  #nextSet = 1;
  #seq = 0n;

  /** Creates a set and allocates IOASIDs in it (as VFIO would), returning the set id. */
  setWith(...ioasids: number[]): number {
    const setId = this.#nextSet++;
    this.#sets.set(setId, { token: BigInt(1000 + setId), type: events.TokenType.TOKEN_TYPE_MM, quota: 0 });
    for (const id of ioasids) this.#alloc(setId, id);
    return setId;
  }

  /** VFIO's free: FREE_PENDING (FREE emitted) when references remain, else reclaimed. */
  free(setId: number, ioasid: number): events.IoasidEvent | undefined {
    const x = this.#own(setId, ioasid, 0, true);
    if (x.state === "FREE_PENDING") return undefined;
    x.state = "FREE_PENDING";
    this.#drop(x, "set-owner");
    if (!this.#ioasids.has(ioasid)) return undefined;
    return this.#emit("FREE", x);
  }

  /** What the core would say of an IOASID: refcount, holders, SPID, state. */
  info(ioasid: number): { refcount: number; holders: Record<string, number>; spid: number; state: string } | undefined {
    const x = this.#ioasids.get(ioasid);
    if (x === undefined) return undefined;
    return { refcount: [...x.holders.values()].reduce((a, b) => a + b, 0), holders: Object.fromEntries(x.holders), spid: x.spid, state: x.state };
  }

  /** Releases with an acknowledgement (holder iommu/<instance>/<purpose>). */
  /** What the real core does with an ack's detach_spid: detach, silently on a FREE_PENDING IOASID. */
  ackDetachSpid(ioasid: number): void {
    const x = this.#ioasids.get(ioasid);
    if (x === undefined || x.spid === 0) return;
    if (x.state === "ACTIVE") this.#emit("UNBIND", x);
    x.spid = 0;
  }

  ackRelease(ioasid: number, holder: core.Holder): void {
    const x = this.#ioasids.get(ioasid);
    if (x !== undefined && x.holders.has(key(holder))) this.#drop(x, key(holder));
  }

  async find(req: core.FindRequest): Promise<core.FindResponse> {
    this.#call("find");
    const x = this.#own(req.setId, req.ioasid, req.generation, false);
    return { info: this.#toInfo(x) };
  }
  async findBySpid(req: core.FindBySpidRequest): Promise<core.FindBySpidResponse> {
    this.#call("findBySpid");
    this.#set(req.setId);
    const x = [...this.#ioasids.values()].find((i) => i.setId === req.setId && i.spid === req.spid);
    if (x === undefined) throw err(Code.NOT_FOUND, "SPID_NOT_FOUND");
    if (x.state === "FREE_PENDING") throw err(Code.NOT_FOUND, "IOASID_FREE_PENDING");
    return { ioasid: x.ioasid, generation: x.generation, refcount: this.info(x.ioasid)!.refcount };
  }
  async get(req: core.GetRequest): Promise<core.GetResponse> {
    this.#call("get");
    const x = this.#own(req.setId, req.ioasid, req.generation, false);
    x.holders.set(key(req.holder), (x.holders.get(key(req.holder)) ?? 0) + 1);
    if (this.loseAnswerOf.delete("get")) throw err(Code.UNAVAILABLE, "UNAVAILABLE");
    return { refcount: this.info(x.ioasid)!.refcount };
  }
  async put(req: core.PutRequest): Promise<core.PutResponse> {
    this.#call("put");
    const x = this.#own(req.setId, req.ioasid, req.generation, true);
    if (!x.holders.has(key(req.holder))) throw err(Code.FAILED_PRECONDITION, "NO_REFERENCE_HELD");
    this.#drop(x, key(req.holder));
    const left = this.info(req.ioasid)?.refcount ?? 0;
    return { refcount: left, reclaimed: left === 0 };
  }
  async attachSpid(req: core.AttachSpidRequest): Promise<core.AttachSpidResponse> {
    this.#call("attachSpid");
    const x = this.#own(req.setId, req.ioasid, req.generation, false);
    if (x.spid !== 0) throw err(Code.FAILED_PRECONDITION, "SPID_ALREADY_ATTACHED");
    if ([...this.#ioasids.values()].some((i) => i.setId === req.setId && i.spid === req.spid)) throw err(Code.INVALID_ARGUMENT, "SPID_IN_USE");
    x.spid = req.spid;
    this.#emit("BIND", x);
    return {};
  }
  async detachSpid(req: core.DetachSpidRequest): Promise<core.DetachSpidResponse> {
    this.#call("detachSpid");
    const x = this.#own(req.setId, req.ioasid, req.generation, true);
    if (x.spid === 0) throw err(Code.FAILED_PRECONDITION, "SPID_NOT_ATTACHED");
    const spid = x.spid;
    const emit = x.state === "ACTIVE";
    if (emit) this.#emit("UNBIND", x);
    x.spid = 0;
    return { spid, unbindEmitted: emit };
  }
  async describe(req: core.DescribeRequest): Promise<core.DescribeResponse> {
    this.#call("describe");
    const x = this.#ioasids.get(req.ioasid);
    if (x === undefined) throw err(Code.NOT_FOUND, "IOASID_NOT_FOUND");
    return { info: this.#toInfo(x) };
  }
  async createSet(req: core.CreateSetRequest): Promise<core.CreateSetResponse> {
    this.#call("createSet");
    for (const s of this.#sets.values()) if (s.token === req.token && s.type === req.tokenType) throw err(Code.ALREADY_EXISTS, "TOKEN_IN_USE");
    const setId = this.#nextSet++;
    this.#sets.set(setId, { token: req.token, type: req.tokenType, quota: req.quota });
    return { set: core.IoasidSet.fromPartial({ setId, tokenType: req.tokenType, token: req.token, quota: req.quota }) };
  }
  async getSet(req: core.GetSetRequest): Promise<core.GetSetResponse> {
    this.#call("getSet");
    for (const [setId, s] of this.#sets) {
      if (s.token === req.token && s.type === req.tokenType) return { set: core.IoasidSet.fromPartial({ setId, token: s.token, tokenType: s.type }) };
    }
    throw err(Code.NOT_FOUND, "SET_NOT_FOUND");
  }
  async destroySet(req: core.DestroySetRequest): Promise<core.DestroySetResponse> {
    this.#call("destroySet");
    this.#set(req.setId);
    if ([...this.#ioasids.values()].some((i) => i.setId === req.setId)) throw err(Code.FAILED_PRECONDITION, "SET_NOT_EMPTY");
    this.#sets.delete(req.setId);
    return {};
  }
  async listSets(_req: core.ListSetsRequest): Promise<core.ListSetsResponse> {
    this.#call("listSets");
    return { sets: [...this.#sets.keys()].map((setId) => core.IoasidSet.fromPartial({ setId })) };
  }
  async listIoasids(req: core.ListIoasidsRequest): Promise<core.ListIoasidsResponse> {
    this.#call("listIoasids");
    return { ioasids: [...this.#ioasids.values()].filter((i) => req.setId === 0 || i.setId === req.setId).map((i) => this.#toInfo(i)) };
  }
  async alloc(req: core.AllocRequest): Promise<core.AllocResponse> {
    this.#call("alloc");
    const s = this.#set(req.setId);
    const used = [...this.#ioasids.values()].filter((i) => i.setId === req.setId).length;
    if (s.quota !== 0 && used >= s.quota) throw err(Code.RESOURCE_EXHAUSTED, "SET_QUOTA_EXCEEDED");
    const max = req.max === 0 ? (1 << 20) - 1 : req.max;
    for (let id = Math.max(req.min, 1); id <= max; id++) {
      if (!this.#ioasids.has(id)) {
        const x = this.#alloc(req.setId, id);
        return { ioasid: id, generation: x.generation };
      }
    }
    throw err(Code.RESOURCE_EXHAUSTED, "IOASID_RANGE_EXHAUSTED");
  }
  async freeSet(req: core.FreeSetRequest): Promise<core.FreeSetResponse> {
    this.#call("freeSet");
    this.#set(req.setId);
    let freed = 0;
    for (const x of [...this.#ioasids.values()]) {
      if (x.setId === req.setId && x.state === "ACTIVE") {
        this.free(req.setId, x.ioasid);
        freed++;
      }
    }
    const empty = ![...this.#ioasids.values()].some((i) => i.setId === req.setId);
    if (empty) this.#sets.delete(req.setId);
    return { freed, destroyed: empty };
  }

  #call(name: string): void {
    this.calls.push(name);
    const e = this.failNext.get(name);
    if (e !== undefined) {
      this.failNext.delete(name);
      throw e;
    }
  }

  #set(setId: number) {
    const s = this.#sets.get(setId);
    if (s === undefined) throw err(Code.INVALID_ARGUMENT, "SET_UNKNOWN");
    return s;
  }

  #own(setId: number, ioasid: number, generation: number, allowFreePending: boolean): FakeIoasid {
    this.#set(setId);
    const x = this.#ioasids.get(ioasid);
    if (x === undefined) throw err(Code.NOT_FOUND, "IOASID_NOT_FOUND");
    if (x.setId !== setId) throw err(Code.PERMISSION_DENIED, "IOASID_NOT_IN_SET");
    if (generation !== 0 && generation !== x.generation) throw err(Code.FAILED_PRECONDITION, "STALE_GENERATION");
    if (!allowFreePending && x.state === "FREE_PENDING") throw err(Code.NOT_FOUND, "IOASID_FREE_PENDING");
    return x;
  }

  #alloc(setId: number, ioasid: number): FakeIoasid {
    const generation = (this.#generations.get(ioasid) ?? 0) + 1;
    this.#generations.set(ioasid, generation);
    const x: FakeIoasid = { ioasid, setId, generation, state: "ACTIVE", spid: 0, holders: new Map([["set-owner", 1]]) };
    this.#ioasids.set(ioasid, x);
    return x;
  }

  #drop(x: FakeIoasid, holder: string): void {
    const n = (x.holders.get(holder) ?? 0) - 1;
    if (n <= 0) x.holders.delete(holder);
    else x.holders.set(holder, n);
    if (x.holders.size === 0) {
      this.#ioasids.delete(x.ioasid);
      this.#emit("RECLAIM", x);
    }
  }

  #emit(type: "BIND" | "UNBIND" | "FREE" | "RECLAIM", x: FakeIoasid): events.IoasidEvent {
    const seq = ++this.#seq;
    this.events.push({ type, ioasid: x.ioasid, generation: x.generation, spid: x.spid, setId: x.setId, seq });
    return events.IoasidEvent.fromPartial({ seq, type: events.EventType[`EVENT_TYPE_${type}`], ioasid: x.ioasid, generation: x.generation, spid: x.spid, setId: x.setId });
  }

  #toInfo(x: FakeIoasid): core.IoasidInfo {
    return core.IoasidInfo.fromPartial({
      ioasid: x.ioasid,
      setId: x.setId,
      generation: x.generation,
      state: x.state === "ACTIVE" ? core.IoasidState.IOASID_STATE_ACTIVE : core.IoasidState.IOASID_STATE_FREE_PENDING,
      refcount: this.info(x.ioasid)?.refcount ?? 0,
      holders: [...x.holders].map(([k, count]) => {
        const [role, instance, purpose] = k.split("/");
        return { holder: { role: role!, instance: instance ?? "", purpose: purpose ?? "" }, count };
      }),
      spid: x.spid,
    });
  }
}

import { describe, expect, it } from "vitest";
import { Code } from "@ioasid/errors";
import fc from "fast-check";
import { FAULT_GROUP_ID_BLOCK, PageRequestQueue, ResponseSource, type RaiseSpec } from "./page-requests.js";
import type { AttachHandle } from "./iommu-hardware.js";
import { memoryIommuState } from "../adapters/memory-iommu-state.js";

const R = { read: true, write: false, execute: false, privileged: false };

function handle(id: bigint, owner = "vfio/1", pasid = 7, generation = 1): AttachHandle {
  return {
    handleId: id,
    kind: "GPASID_BIND",
    domainId: 1,
    deviceId: "d0",
    pasid,
    withoutPasid: false,
    owner,
    ownerData: new Uint8Array(),
    setId: 1,
    gpasid: 3,
    generation,
    createdAt: new Date(0),
  };
}

function req(over: Partial<RaiseSpec> = {}): RaiseSpec {
  return { deviceId: "d0", credits: 32, pasid: 7, withoutPasid: false, address: 0x1234n, access: R, prgi: undefined, lastRequest: true, ...over };
}

function clock() {
  let t = 1_000;
  return { now: () => new Date(t), advance: (ms: number) => (t += ms) };
}

const refused = (f: () => unknown, code: Code, reason: string) => expect(f).toThrow(expect.objectContaining({ code, reason }));

describe("PageRequestQueue", () => {
  it("gathers a three-request group on the partial list and completes it with the last request", () => {
    const q = new PageRequestQueue({ timeoutMs: 1000 });
    const h = handle(1n);
    const a = q.raise(req({ prgi: 5, lastRequest: false, address: 0x1000n }), h);
    const b = q.raise(req({ prgi: 5, lastRequest: false, address: 0x2000n }), h);
    expect(a).toMatchObject({ kind: "queued", complete: false, group: { state: "PARTIAL" } });
    expect(b).toMatchObject({ kind: "queued", complete: false });
    if (a.kind !== "queued" || b.kind !== "queued") throw new Error("unreachable");
    expect(b.group.faultGroupId).toBe(a.group.faultGroupId);
    refused(() => q.respond(a.group.faultGroupId, "SUCCESS", ResponseSource.HANDLER, "vfio/1"), Code.FAILED_PRECONDITION, "FAULT_GROUP_INCOMPLETE");
    const c = q.raise(req({ prgi: 5, lastRequest: true, address: 0x3004n }), h);
    expect(c).toMatchObject({ kind: "queued", complete: true, group: { state: "PENDING", prgi: 5 } });
    if (c.kind !== "queued") throw new Error("unreachable");
    expect(c.group.requests.map((r) => r.address)).toEqual([0x1000n, 0x2000n, 0x3000n]);
    expect(q.outstandingRequests("d0")).toBe(3);
    const answered = q.respond(c.group.faultGroupId, "SUCCESS", ResponseSource.HANDLER, "vfio/1");
    expect(answered).toMatchObject({ state: "RESPONDED", responseCode: "SUCCESS", responseSource: "HANDLER" });
    expect(q.outstandingRequests("d0")).toBe(0);
  });

  it("answers a group exactly once: a second answer, or one by another owner, is refused and changes nothing", () => {
    const q = new PageRequestQueue({ timeoutMs: 1000 });
    const r = q.raise(req(), handle(1n));
    if (r.kind !== "queued") throw new Error("unreachable");
    const id = r.group.faultGroupId;
    refused(() => q.respond(id, "SUCCESS", ResponseSource.HANDLER, "vfio/2"), Code.PERMISSION_DENIED, "FAULT_GROUP_NOT_OWNED");
    expect(q.get(id)?.state).toBe("PENDING");
    q.respond(id, "INVALID", ResponseSource.HANDLER, "vfio/1");
    refused(() => q.respond(id, "SUCCESS", ResponseSource.HANDLER, "vfio/1"), Code.FAILED_PRECONDITION, "FAULT_GROUP_ALREADY_RESPONDED");
    expect(q.get(id)).toMatchObject({ responseCode: "INVALID" });
    refused(() => q.respond(999n, "SUCCESS", ResponseSource.HANDLER, "vfio/1"), Code.NOT_FOUND, "FAULT_GROUP_NOT_FOUND");
    expect(q.answerHandle(1n, ResponseSource.DETACH)).toEqual([]);
  });

  it("answers only the selected handle's groups on detach, partial and pending alike", () => {
    const q = new PageRequestQueue({ timeoutMs: 1000 });
    q.raise(req({ prgi: 1, lastRequest: false }), handle(1n));
    q.raise(req(), handle(1n));
    q.raise(req({ pasid: 8 }), handle(2n, "vfio/1", 8));
    const answered = q.answerHandle(1n, ResponseSource.DETACH);
    expect(answered.map((g) => [g.state, g.responseCode, g.responseSource])).toEqual([
      ["RESPONDED", "INVALID", "DETACH"],
      ["RESPONDED", "INVALID", "DETACH"],
    ]);
    expect(q.outstanding().map((g) => g.handleId)).toEqual([2n]);
    expect(q.outstandingRequests("d0")).toBe(1);
  });

  it("frees a device's partial groups without a response and leaves complete ones for their answer (io-pgfault since v6.9)", () => {
    const q = new PageRequestQueue({ timeoutMs: 1000 });
    const partial = q.raise(req({ prgi: 1, lastRequest: false }), handle(1n));
    const complete = q.raise(req({ prgi: 2 }), handle(1n));
    const other = q.raise(req({ deviceId: "d1", prgi: 1, lastRequest: false }), handle(2n));
    if (partial.kind !== "queued" || complete.kind !== "queued" || other.kind !== "queued") throw new Error("unreachable");
    const freed = q.discardPartialWhere((g) => g.deviceId === "d0");
    expect(freed.map((g) => [g.faultGroupId, g.state])).toEqual([[partial.group.faultGroupId, "PARTIAL"]]);
    // Gone without an answer: not remembered as responded, its credits back, its prgi free again.
    expect(q.get(partial.group.faultGroupId)).toBeUndefined();
    refused(() => q.respond(partial.group.faultGroupId, "INVALID", ResponseSource.HANDLER), Code.NOT_FOUND, "FAULT_GROUP_NOT_FOUND");
    expect(q.outstanding().map((g) => g.faultGroupId)).toEqual([complete.group.faultGroupId, other.group.faultGroupId]);
    expect(q.outstandingRequests("d0")).toBe(1);
    expect(q.raise(req({ prgi: 1 }), handle(1n)).kind).toBe("queued");
    // The kept state drops it too (a restarted IOMMU does not bring it back).
    expect(q.takeChanges().find((c) => c.key === `fg/${partial.group.faultGroupId}`)).toMatchObject({ value: undefined });
  });

  it("bounds outstanding requests by the device's credits: over the limit nothing is queued and the partial group is answered INVALID", () => {
    const q = new PageRequestQueue({ timeoutMs: 1000 });
    const h = handle(1n);
    q.raise(req({ credits: 3 }), h);
    const partial = q.raise(req({ credits: 3, prgi: 9, lastRequest: false }), h);
    q.raise(req({ credits: 3, prgi: 9, lastRequest: false }), h);
    const over = q.raise(req({ credits: 3, prgi: 9, lastRequest: true }), h);
    if (partial.kind !== "queued") throw new Error("unreachable");
    expect(over).toMatchObject({
      kind: "credits_exhausted",
      answered: { faultGroupId: partial.group.faultGroupId, responseSource: "CREDITS_EXHAUSTED", responseCode: "INVALID" },
    });
    expect(q.outstandingRequests("d0")).toBe(1);
    expect(q.raise(req({ credits: 1 }), h)).toEqual({ kind: "credits_exhausted", answered: undefined });
    // The credits come back with the answer: the device is not stalled.
    expect(q.raise(req({ credits: 3 }), h).kind).toBe("queued");
  });

  it("times out unanswered groups (partial ones too) to INVALID, and only those past their deadline", () => {
    const c = clock();
    const q = new PageRequestQueue({ timeoutMs: 100, now: c.now });
    q.raise(req({ prgi: 2, lastRequest: false }), handle(1n));
    c.advance(60);
    q.raise(req(), handle(1n));
    expect(q.nextDeadline()?.getTime()).toBe(1_100);
    c.advance(50);
    expect(q.expire().map((g) => [g.prgi, g.responseSource])).toEqual([[2, "TIMEOUT"]]);
    c.advance(100);
    expect(q.expire()).toHaveLength(1);
    expect(q.nextDeadline()).toBeUndefined();
  });

  it("refuses a prgi whose group is complete and unanswered, and a partial group joined from another PASID", () => {
    const q = new PageRequestQueue({ timeoutMs: 1000 });
    q.raise(req({ prgi: 4, lastRequest: true }), handle(1n));
    refused(() => q.raise(req({ prgi: 4, lastRequest: true }), handle(1n)), Code.FAILED_PRECONDITION, "PRGI_IN_USE");
    q.raise(req({ prgi: 6, lastRequest: false }), handle(1n));
    refused(() => q.raise(req({ prgi: 6, pasid: 8 }), handle(2n, "vfio/1", 8)), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    refused(() => q.raise(req({ prgi: 512 }), handle(1n)), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    expect(q.outstandingRequests("d0")).toBe(2);
  });

  it("gives every group exactly one response whatever mix of requests, answers, detaches, drains and timeouts", () => {
    const op = fc.oneof(
      fc.record({
        k: fc.constant("raise" as const),
        handle: fc.integer({ min: 1, max: 3 }),
        prgi: fc.option(fc.integer({ min: 0, max: 3 }), { nil: undefined }),
        last: fc.boolean(),
      }),
      fc.record({ k: fc.constant("respond" as const), pick: fc.nat(), owner: fc.constantFrom("vfio/1", "vfio/2") }),
      fc.record({ k: fc.constant("detach" as const), handle: fc.integer({ min: 1, max: 3 }) }),
      fc.record({ k: fc.constant("free" as const), pasid: fc.integer({ min: 1, max: 3 }) }),
      fc.record({ k: fc.constant("tick" as const), ms: fc.integer({ min: 0, max: 80 }) }),
    );
    fc.assert(
      fc.property(fc.array(op, { maxLength: 60 }), (ops) => {
        const c = clock();
        const q = new PageRequestQueue({ timeoutMs: 100, now: c.now });
        const responses = new Map<bigint, number>();
        const seen = new Set<bigint>();
        const count = (gs: readonly { faultGroupId: bigint }[]) => gs.forEach((g) => responses.set(g.faultGroupId, (responses.get(g.faultGroupId) ?? 0) + 1));
        for (const o of ops) {
          try {
            if (o.k === "raise") {
              const r = q.raise(req({ prgi: o.prgi, lastRequest: o.last, pasid: o.handle, credits: 6 }), handle(BigInt(o.handle), "vfio/1", o.handle));
              if (r.kind === "queued") seen.add(r.group.faultGroupId);
              else if (r.answered !== undefined) count([r.answered]);
            } else if (o.k === "respond") {
              const ids = [...seen];
              if (ids.length > 0) count([q.respond(ids[o.pick % ids.length]!, "SUCCESS", ResponseSource.HANDLER, o.owner)]);
            } else if (o.k === "detach") count(q.answerHandle(BigInt(o.handle), ResponseSource.DETACH));
            else if (o.k === "free") count(q.answerWhere((g) => g.pasid === o.pasid, ResponseSource.IOASID_FREED));
            else {
              c.advance(o.ms);
              count(q.expire());
            }
          } catch (err) {
            if ((err as { reason?: string }).reason === undefined) throw err;
          }
        }
        // Heal: everything left times out.
        c.advance(1_000);
        count(q.expire());
        for (const id of seen) expect(responses.get(id), `group ${id}`).toBe(1);
        expect(q.outstanding()).toEqual([]);
        expect(q.outstandingRequests("d0")).toBe(0);
      }),
      { numRuns: 300 },
    );
  });
});

describe("PageRequestQueue kept in a store", () => {
  it("comes back with its outstanding groups (partial and pending) and its id counter, through the state codec", async () => {
    const c = clock();
    const q = new PageRequestQueue({ timeoutMs: 1000, now: c.now });
    q.raise(req({ prgi: 4, lastRequest: false }), handle(1n));
    q.raise(req({ prgi: 5, address: 0x9000n }), handle(2n, "vfio/2", 8, 3));
    const store = memoryIommuState();
    await store.write(q.takeChanges());
    const back = PageRequestQueue.restore(store.saved, { timeoutMs: 1000, now: c.now });
    expect(back.outstanding()).toEqual(q.outstanding());
    // Ids continue after the kept counter: ids 1 and 2 came from the block [1, 1 + BLOCK), so the
    // restart starts at the block's end — no id is handed out twice.
    const next = back.raise(req({ prgi: 6 }), handle(3n));
    expect(next.kind === "queued" && next.group.faultGroupId).toBe(1n + FAULT_GROUP_ID_BLOCK);
  });

  it("writes the id counter once per block of ids, not with every group (issue 15: one JetStream message less per page request)", () => {
    const q = new PageRequestQueue({ timeoutMs: 1000 });
    const keys = () => q.takeChanges().map((c) => c.key);
    const first = q.raise(req({ prgi: 1 }), handle(1n));
    expect(keys()).toEqual(["fgid", `fg/${first.kind === "queued" && first.group.faultGroupId}`]);
    for (let i = 2; i <= 5; i++) {
      const r = q.raise(req({ prgi: i }), handle(1n));
      if (r.kind !== "queued") throw new Error("unreachable");
      expect(keys()).toEqual([`fg/${r.group.faultGroupId}`]);
      q.respond(r.group.faultGroupId, "SUCCESS", ResponseSource.HANDLER, "vfio/1");
      expect(keys()).toEqual([`fg/${r.group.faultGroupId}`]); // the answer: the group alone
    }
  });

  it("reserves the next block when one is used up, and never hands out an id at or below a kept group's after a restart", async () => {
    const q = new PageRequestQueue({ timeoutMs: 1000 });
    const store = memoryIommuState();
    let last = 0n;
    for (let i = 0n; i < FAULT_GROUP_ID_BLOCK + 2n; i++) {
      const r = q.raise(req({ prgi: Number(i % 500n) }), handle(1n));
      if (r.kind !== "queued") throw new Error("unreachable");
      last = r.group.faultGroupId;
      q.respond(last, "SUCCESS", ResponseSource.HANDLER, "vfio/1");
      await store.write(q.takeChanges());
    }
    expect(last).toBe(FAULT_GROUP_ID_BLOCK + 2n);
    const counter = store.saved.get("fgid");
    expect(counter?.kind === "faultGroupCounter" && counter.nextFaultGroupId).toBe(2n * FAULT_GROUP_ID_BLOCK + 1n);
    // Restarted from that store: past every id used.
    const back = PageRequestQueue.restore(store.saved, { timeoutMs: 1000 });
    const next = back.raise(req({ prgi: 7 }), handle(1n));
    expect(next.kind === "queued" && next.group.faultGroupId).toBe(2n * FAULT_GROUP_ID_BLOCK + 1n);
    // A kept group above the kept counter (a counter lost, or written before blocks): past the group.
    const pending = q.raise(req({ prgi: 8 }), handle(1n));
    if (pending.kind !== "queued") throw new Error("unreachable");
    const saved = new Map(store.saved);
    saved.set(`fg/${pending.group.faultGroupId}`, q.takeChanges().find((c) => c.key === `fg/${pending.group.faultGroupId}`)!.value!);
    saved.set("fgid", { kind: "faultGroupCounter", nextFaultGroupId: 1n });
    const again = PageRequestQueue.restore(saved, { timeoutMs: 1000 });
    const after = again.raise(req({ prgi: 9 }), handle(1n));
    expect(after.kind === "queued" && after.group.faultGroupId).toBe(pending.group.faultGroupId + 1n);
  });
});

import { Code, DomainError, isDomainError } from "@ioasid/errors";
import { EventType, Priority, TokenType, type Holder } from "@ioasid/ioasid";
import { createCoreClient, createGrpcCorePort, ensureRegistration, heldReferences, type CorePort } from "@ioasid/role-kit";
import { InProcessCore } from "@ioasid/testkit";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startCore, type CoreFixture } from "../support/core-fixture.js";

// The roles' one port to the core has two implementations: the gRPC one a running role uses and
// the testkit's in-process core its unit tests use. The same script runs through both — the real
// core process over gRPC and the in-process model — and must give the same transcript, so that a
// unit test on the in-process core tells the truth about the service.

const KVM: Holder = { role: "kvm", instance: "vm-1", purpose: "vmcs" };
const VDCM: Holder = { role: "vdcm", instance: "vdcm0", purpose: "dsa0.wq0" };

/** One step's outcome: its answer, or the refusal's code and reason. */
type Step = { readonly step: string; readonly ok?: unknown; readonly refused?: { code: number; reason: string } };

async function step(out: Step[], name: string, call: () => Promise<unknown>): Promise<unknown> {
  try {
    const ok = await call();
    out.push({ step: name, ok: ok === undefined ? "(none)" : ok });
    return ok;
  } catch (err) {
    if (!isDomainError(err)) throw err;
    out.push({ step: name, refused: { code: err.code, reason: err.reason } });
    return undefined;
  }
}

/** The document's guest life cycle and the refusals around it, through a port. */
async function transcript(core: CorePort): Promise<Step[]> {
  const out: Step[] = [];
  const token = { type: TokenType.MM, value: 0x4242n };
  // KVM registers by MM token before VFIO creates the set: pending (L4).
  const reg = (await step(out, "register mm (pending)", () =>
    core.register({
      subscriber: { name: "kvm", instance: "vm-1" },
      priority: Priority.CPU,
      scope: { kind: "mm", token: token.value },
      events: [EventType.BIND, EventType.UNBIND, EventType.FREE],
    }),
  )) as { id: number };
  const set = (await step(out, "createSet", () => core.createSet(token, 8))) as { id: number };
  await step(out, "createSet same token", () => core.createSet(token, 8));
  await step(out, "listRegistrations (active)", () => core.listRegistrations());
  await step(out, "register same again", () =>
    core.register({
      subscriber: { name: "kvm", instance: "vm-1" },
      priority: Priority.CPU,
      scope: { kind: "mm", token: token.value },
      events: [EventType.BIND, EventType.UNBIND, EventType.FREE],
    }),
  );
  await step(out, "ensureRegistration same again (finds it)", () =>
    ensureRegistration(core, {
      subscriber: { name: "kvm", instance: "vm-1" },
      priority: Priority.CPU,
      scope: { kind: "mm", token: token.value },
      events: [EventType.BIND, EventType.UNBIND, EventType.FREE],
    }),
  );
  const a = (await step(out, "alloc", () => core.alloc(set.id))) as { ioasid: number; generation: number };
  await step(out, "alloc out of range", () => core.alloc(set.id, { min: 2_000_000, max: 2_000_001 }));
  await step(out, "attachSpid", () => core.attachSpid(set.id, a.ioasid, 101, a.generation));
  await step(out, "attachSpid duplicate SPID", async () => {
    const b = await core.alloc(set.id);
    try {
      return await core.attachSpid(set.id, b.ioasid, 101, b.generation);
    } finally {
      await core.free(set.id, b.ioasid, b.generation);
    }
  });
  await step(out, "get (kvm)", () => core.get(set.id, a.ioasid, KVM, a.generation));
  await step(out, "findBySpid with a reference (vdcm)", () => core.findBySpid(set.id, 101, VDCM));
  await step(out, "heldReferences (vdcm)", () => heldReferences(core, set.id, VDCM));
  await step(out, "findBySpid unknown", () => core.findBySpid(set.id, 999));
  await step(out, "get stale generation", () => core.get(set.id, a.ioasid, KVM, a.generation + 1));
  await step(out, "get of another set", () => core.get(set.id + 1000, a.ioasid, KVM, a.generation));
  await step(out, "find", () => core.find(set.id, a.ioasid, a.generation));
  await step(out, "describe", () => core.describe(a.ioasid));
  await step(out, "free → FREE_PENDING", () => core.free(set.id, a.ioasid, a.generation));
  await step(out, "free again", () => core.free(set.id, a.ioasid, a.generation));
  await step(out, "get in FREE_PENDING", () => core.get(set.id, a.ioasid, KVM, a.generation));
  await step(out, "find in FREE_PENDING", () => core.find(set.id, a.ioasid, a.generation));
  await step(out, "detachSpid in FREE_PENDING (no UNBIND)", () => core.detachSpid(set.id, a.ioasid, a.generation));
  await step(out, "listIoasids", () => core.listIoasids(set.id));
  await step(out, "put (kvm)", () => core.put(set.id, a.ioasid, KVM, a.generation));
  await step(out, "put (kvm) holding none", () => core.put(set.id, a.ioasid, KVM, a.generation));
  await step(out, "destroySet non-empty", () => core.destroySet(set.id));
  await step(out, "put (vdcm) → reclaimed", () => core.put(set.id, a.ioasid, VDCM, a.generation));
  await step(out, "describe reclaimed", () => core.describe(a.ioasid));
  await step(out, "getSet", () => core.getSet(set.id));
  await step(out, "listSets", () => core.listSets());
  await step(out, "alloc two, freeSet", async () => {
    await core.alloc(set.id);
    await core.alloc(set.id);
    return core.freeSet(set.id);
  });
  await step(out, "getSet after freeSet", () => core.getSet(set.id));
  await step(out, "listRegistrations (pending again)", () => core.listRegistrations());
  await step(out, "unregister", () => core.unregister(reg.id));
  await step(out, "unregister again", () => core.unregister(reg.id));
  const other = (await step(out, "createSet NONE", () => core.createSet({ type: TokenType.NONE, value: 7n }, 0))) as { id: number };
  await step(out, "destroySet empty", () => core.destroySet(other.id));
  return out;
}

describe("CorePort: the gRPC port to the core process and the testkit's in-process core", () => {
  let fixture: CoreFixture;
  beforeAll(async () => {
    fixture = await startCore();
  });
  afterAll(async () => {
    expect(await fixture?.stop()).toBe(0);
  });

  it("give the same transcript for the guest life cycle and its refusals", async () => {
    const client = createCoreClient(fixture.proc.address);
    let overGrpc: Step[];
    try {
      overGrpc = await transcript(createGrpcCorePort(client));
    } finally {
      client.close();
    }
    const inProcess = await transcript(new InProcessCore());
    expect(inProcess).toEqual(overGrpc);

    // And the transcript is the core's rules, not two implementations agreeing on something else.
    const by = new Map(overGrpc.map((s) => [s.step, s]));
    expect(by.get("register mm (pending)")?.ok).toMatchObject({ active: false, setId: 0 });
    expect(by.get("listRegistrations (active)")?.ok).toMatchObject([{ active: true }]);
    expect(by.get("createSet same token")?.refused?.reason).toBe("TOKEN_IN_USE");
    expect(by.get("register same again")?.refused?.reason).toBe("REGISTRATION_EXISTS");
    expect(by.get("ensureRegistration same again (finds it)")?.ok).toEqual((by.get("listRegistrations (active)")?.ok as unknown[])[0]);
    expect(by.get("attachSpid duplicate SPID")?.refused?.reason).toBe("SPID_IN_USE");
    expect(by.get("findBySpid with a reference (vdcm)")?.ok).toMatchObject({ refcount: 3 });
    expect(by.get("heldReferences (vdcm)")?.ok).toEqual([
      { setId: expect.any(Number), ioasid: expect.any(Number), generation: expect.any(Number), purpose: VDCM.purpose, count: 1 },
    ]);
    expect(by.get("findBySpid unknown")?.refused?.reason).toBe("SPID_NOT_FOUND");
    expect(by.get("get stale generation")?.refused?.reason).toBe("STALE_GENERATION");
    expect(by.get("free → FREE_PENDING")?.ok).toEqual({ outcome: "FREE_PENDING", refcount: 2 });
    expect(by.get("free again")?.ok).toMatchObject({ outcome: "ALREADY_FREE_PENDING" });
    expect(by.get("get in FREE_PENDING")?.refused?.reason).toBe("IOASID_FREE_PENDING");
    expect(by.get("detachSpid in FREE_PENDING (no UNBIND)")?.ok).toEqual({ spid: 101, unbindEmitted: false });
    expect(by.get("put (kvm) holding none")?.refused?.reason).toBe("NO_REFERENCE_HELD");
    expect(by.get("put (vdcm) → reclaimed")?.ok).toEqual({ refcount: 0, reclaimed: true });
    expect(by.get("describe reclaimed")?.ok).toBe("(none)");
    expect(by.get("getSet after freeSet")?.refused?.reason).toBe("SET_NOT_FOUND");
    expect(by.get("listRegistrations (pending again)")?.ok).toMatchObject([{ active: false, setId: 0 }]);
    expect(by.get("unregister again")?.refused?.reason).toBe("REGISTRATION_NOT_FOUND");
  });

  it("in process: an injected failure changes nothing; a lost answer was applied", async () => {
    const core = new InProcessCore();
    const set = await core.createSet({ type: TokenType.MM, value: 1n }, 0);
    const a = await core.alloc(set.id);
    core.failNext("get");
    await expect(core.get(set.id, a.ioasid, KVM, a.generation)).rejects.toMatchObject({ reason: "UNAVAILABLE" });
    expect(core.space.describe(a.ioasid)?.refcount).toBe(1);
    core.loseAnswerOf("get");
    await expect(core.get(set.id, a.ioasid, KVM, a.generation)).rejects.toMatchObject({ reason: "UNAVAILABLE" });
    expect(core.space.describe(a.ioasid)?.refcount).toBe(2);
    expect(await core.get(set.id, a.ioasid, KVM, a.generation)).toEqual({ refcount: 3 });
    expect(core.calls).toEqual(["createSet", "alloc", "get", "get", "get"]);
    await core.free(set.id, a.ioasid, a.generation);
    expect(core.eventsAfter(0, a.ioasid).map((e) => e.type)).toEqual([EventType.ALLOC, EventType.FREE]);
  });

  it("in process: the core unreachable, a slow answer, the calls with their arguments, and events to a subscriber", async () => {
    const core = new InProcessCore();
    const seen: EventType[] = [];
    const stop = core.subscribe((e) => seen.push(e.type));
    const set = await core.createSet({ type: TokenType.MM, value: 1n }, 0);
    core.unreachable = true;
    await expect(core.alloc(set.id)).rejects.toMatchObject({ reason: "UNAVAILABLE" });
    expect(core.space.listIoasids(set.id)).toEqual([]);
    core.unreachable = false;
    const a = await core.alloc(set.id);
    let answer = (): void => {};
    core.holdAnswerOf("get", new Promise<void>((resolve) => (answer = resolve)));
    let answered = false;
    const got = core.get(set.id, a.ioasid, KVM, a.generation).then((r) => ((answered = true), r));
    await new Promise((resolve) => setImmediate(resolve));
    expect(core.space.describe(a.ioasid)?.refcount).toBe(2); // applied…
    expect(answered).toBe(false); // …not answered yet
    answer();
    expect(await got).toEqual({ refcount: 2 });
    core.loseAnswerOf("put", 1, new DomainError(Code.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", "deadline exceeded"));
    await expect(core.put(set.id, a.ioasid, KVM, a.generation)).rejects.toMatchObject({ reason: "DEADLINE_EXCEEDED" });
    expect(core.space.describe(a.ioasid)?.refcount).toBe(1);
    expect(core.requests.map((r) => r.call)).toEqual(core.calls);
    expect(core.requests.at(-1)).toEqual({ call: "put", args: [set.id, a.ioasid, KVM, a.generation] });
    // Events reach a subscriber after the change that committed them, in order, until it stops.
    expect(seen).toEqual([EventType.SET_ALLOC, EventType.ALLOC]);
    stop();
    await core.free(set.id, a.ioasid);
    await new Promise((resolve) => setImmediate(resolve));
    expect(seen).toEqual([EventType.SET_ALLOC, EventType.ALLOC]);
  });
});

import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code, DomainError } from "@ioasid/errors";
import { core, iommu } from "@ioasid/proto";
import { waitFor } from "@ioasid/testkit";
import { expectRefused } from "../support/core-fixture.js";
import { createVmSet, devicesWithStage2, eventsOf, holdersOf, nextSeq, startIommuStack, type IommuStack } from "../support/iommu-fixture.js";

// The iommufd model's replace and failure injection (DESIGN §5 "iommufd model", issue 16 items 1
// and 2) through the IOMMU's built process, with the real core and NATS. The IOMMU runs with
// IOASID_IOMMU_FAULT_INJECTION=1 so InjectFailure is served.

const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);
const OP = iommu.FailureInjectionOperation;
const OWNER = "test/replace";
const KVM = { role: "kvm", instance: "vm-r", purpose: "vmcs" };

let stack: IommuStack;
let nextToken = 0x9000n;
let nextDevice = 0;
const newDevice = () => `0000:7b:${(nextDevice++).toString(16).padStart(2, "0")}.0`;

beforeAll(async () => {
  stack = await startIommuStack({ iommu: { IOASID_IOMMU_FAULT_INJECTION: "1" } });
});
afterAll(async () => {
  expect(await stack?.stop()).toBe(0);
});

/** A VM's set with one allocated IOASID and a device whose stage 2 is attached without PASID. */
async function vm() {
  const { c, iommu: client } = stack;
  const setId = await createVmSet(c, nextToken++);
  const deviceId = newDevice();
  const stage2 = await devicesWithStage2(client, deviceId);
  const { ioasid, generation } = await c.alloc(P(core.AllocRequest, { setId }));
  return { setId, deviceId, stage2, ioasid, generation };
}

const paging = async () => (await stack.iommu.createDomain(P(iommu.CreateDomainRequest, { type: iommu.DomainType.DOMAIN_TYPE_PAGING }))).domain!.domainId;
const nested = async (parentDomainId: number, guestPgtable = 0x7000n) =>
  (await stack.iommu.createDomain(P(iommu.CreateDomainRequest, { type: iommu.DomainType.DOMAIN_TYPE_NESTED, parentDomainId, guestPgtable }))).domain!.domainId;

/** The IOMMU's state of one device (and every domain), without the snapshot's time. */
async function stateOf(deviceId: string) {
  const { takenAt: _takenAt, ...rest } = await stack.iommu.queryState(P(iommu.QueryStateRequest, { deviceIds: [deviceId], maxIotlbFlushes: 1000 }));
  return rest;
}

/**
 * The tables' own invariants, whatever happened: every PASID entry is one live handle's, at most
 * one handle per target, every domain's attach count is the number of handles on it, and every
 * outstanding fault group belongs to a live handle.
 */
async function expectConsistent(deviceId: string): Promise<void> {
  const s = await stateOf(deviceId);
  const handles = new Map(s.attachHandles.map((h) => [h.handleId, h]));
  const targets = s.attachHandles.map((h) => `${h.deviceId}/${h.withoutPasid ? "rid" : h.pasid}`);
  expect(new Set(targets).size, "one handle per target").toBe(targets.length);
  for (const d of s.devices) {
    for (const e of d.pasidEntries) {
      const h = handles.get(e.handleId);
      expect(h, `entry ${d.deviceId}/${e.pasid} has a live handle`).toBeDefined();
      expect([h!.domainId, h!.pasid, h!.withoutPasid]).toEqual([e.domainId, e.pasid, e.withoutPasid]);
    }
    expect(d.pasidEntries.length).toBe(s.attachHandles.filter((h) => h.deviceId === d.deviceId).length);
  }
  const all = (await stack.iommu.queryState(P(iommu.QueryStateRequest, {}))).attachHandles;
  for (const d of s.domains) expect(d.attachCount, `domain ${d.domainId}'s attach count`).toBe(all.filter((h) => h.domainId === d.domainId).length);
  for (const g of s.faultGroups) expect(handles.has(g.handleId), `fault group ${g.faultGroupId} belongs to a live handle`).toBe(true);
}

/** A fault-handler stream for OWNER that collects what it is sent. */
function faultHandler() {
  const seen: iommu.SubscribeFaultGroupsResponse[] = [];
  const ac = new AbortController();
  void (async () => {
    try {
      for await (const m of stack.iommu.subscribeFaultGroups({ owner: OWNER }, { signal: ac.signal })) seen.push(m);
    } catch {
      /* aborted */
    }
  })();
  return { seen, stop: () => ac.abort() };
}

/**
 * A DMA miss at `pasid` that is pending at the handler. Until the handler's stream is open a
 * completed group is answered FAILURE at once (no handler): those attempts end answered, and the
 * next is made, so the wait does not rely on how long the stream takes to open.
 */
async function pendingGroup(h: ReturnType<typeof faultHandler>, deviceId: string, pasid: number, address: bigint): Promise<bigint> {
  let id = 0n;
  await waitFor(
    async () => {
      const r = await stack.iommu.translate(
        P(iommu.TranslateRequest, { deviceId, pasid, address, access: { read: true }, pageRequestGroup: { prgi: 1, lastRequest: true } }),
      );
      expect(r.outcome).toBe(iommu.TranslateOutcome.TRANSLATE_OUTCOME_PAGE_REQUEST);
      id = r.faultGroupId;
      return h.seen.some((m) => m.item?.$case === "group" && m.item.value.faultGroupId === id);
    },
    { message: "a page request pending at the handler" },
  );
  return id;
}

const translated = async (deviceId: string, pasid: number, address: bigint) =>
  (await stack.iommu.translate(P(iommu.TranslateRequest, { deviceId, pasid, address, access: { read: true } }))).outputAddress;

describe("iommu: ReplaceDomain (iommufd replace)", () => {
  it("replaces a PASID's domain in one step through paging and nested domains in any order; the attached domain follows, the old one is flushed and its faults answered INVALID", async () => {
    const { c, iommu: client } = stack;
    const v = await vm();
    const p1 = await paging();
    const p2 = await paging();
    const n1 = await nested(p1);
    await client.map(P(iommu.MapRequest, { domainId: p1, iova: 0x10000n, paddr: 0x1_0000_0000n, size: 0x1000n, access: { read: true } }));
    await client.map(P(iommu.MapRequest, { domainId: p2, iova: 0x10000n, paddr: 0x2_0000_0000n, size: 0x1000n, access: { read: true } }));
    const attached = (
      await client.attachDomain(P(iommu.AttachDomainRequest, { domainId: p2, deviceId: v.deviceId, pasid: v.ioasid, generation: v.generation, owner: OWNER }))
    ).handle!;
    expect(await translated(v.deviceId, v.ioasid, 0x10010n)).toBe(0x2_0000_0010n);

    // A fault outstanding on the old attachment.
    const h = faultHandler();
    const group = await pendingGroup(h, v.deviceId, v.ioasid, 0x50000n);
    const refsBefore = await holdersOf(c, v.ioasid);

    const replace = (domainId: number, extra: object = {}) =>
      client.replaceDomain(P(iommu.ReplaceDomainRequest, { domainId, deviceId: v.deviceId, pasid: v.ioasid, owner: OWNER, ...extra }));
    const r1 = await replace(p1, { generation: v.generation, ownerData: Buffer.from("after") });
    expect(r1).toMatchObject({ replacedHandleId: attached.handleId, replacedDomainId: p2, answeredFaultGroups: 1 });
    expect(r1.handle).toMatchObject({ kind: iommu.AttachKind.ATTACH_KIND_DOMAIN, domainId: p1, pasid: v.ioasid, generation: v.generation, owner: OWNER });
    expect(r1.handle!.handleId).not.toBe(attached.handleId);
    expect(r1.handle!.ownerData.toString()).toBe("after");
    expect(await client.awaitPageResponse({ deviceId: v.deviceId, faultGroupId: group })).toEqual({
      code: iommu.PageResponseCode.PAGE_RESPONSE_CODE_INVALID,
      source: iommu.PageResponseSource.PAGE_RESPONSE_SOURCE_REPLACE,
    });
    await waitFor(() => h.seen.some((m) => m.item?.$case === "answered" && m.item.value.faultGroupId === group), { message: "the handler told of the answer" });
    h.stop();
    expect(await translated(v.deviceId, v.ioasid, 0x10010n), "translates through the new domain").toBe(0x1_0000_0010n);
    let s = await stateOf(v.deviceId);
    expect(s.iotlbFlushes.at(-1)).toMatchObject({
      cause: iommu.IotlbFlushCause.IOTLB_FLUSH_CAUSE_REPLACE,
      scope: iommu.IotlbFlushScope.IOTLB_FLUSH_SCOPE_PASID,
      domainId: p2,
      pasid: v.ioasid,
      deviceTlb: true,
    });
    expect(s.faultGroups).toEqual([]);
    await expectConsistent(v.deviceId);

    // Paging → nested (over p1) → paging p2 → nested again → the VM's stage 2.
    for (const [domainId, type] of [
      [n1, iommu.DomainType.DOMAIN_TYPE_NESTED],
      [p2, iommu.DomainType.DOMAIN_TYPE_PAGING],
      [n1, iommu.DomainType.DOMAIN_TYPE_NESTED],
      [v.stage2, iommu.DomainType.DOMAIN_TYPE_PAGING],
    ] as const) {
      const r = await replace(domainId);
      expect(r.handle!.domainId).toBe(domainId);
      expect(r.handle!.generation, "the attachment stays the IOASID's").toBe(v.generation);
      s = await stateOf(v.deviceId);
      const entry = s.devices[0]!.pasidEntries.find((e) => e.pasid === v.ioasid && !e.withoutPasid)!;
      expect([entry.domainId, entry.domainType, entry.handleId]).toEqual([domainId, type, r.handle!.handleId]);
      await expectConsistent(v.deviceId);
    }
    // The parent of a nested domain stays in use while the nested one exists, attached or not.
    await expectRefused(client.freeDomain({ domainId: p1 }), Code.FAILED_PRECONDITION, "DOMAIN_IN_USE");
    expect(s.domains.find((d) => d.domainId === n1)!.attachCount).toBe(0);

    // Replacing with the domain already attached changes nothing.
    const before = await stateOf(v.deviceId);
    const same = await replace(v.stage2);
    expect(same).toMatchObject({ replacedHandleId: 0n, replacedDomainId: 0, answeredFaultGroups: 0 });
    expect(await stateOf(v.deviceId)).toEqual(before);
    // No reference was taken or dropped by any of it.
    expect(await holdersOf(c, v.ioasid)).toEqual(refsBefore);

    // The replaced attachment is still the IOASID's: its FREE tears it down (a KVM-like holder's
    // reference keeps the IOASID FREE_PENDING while the FREE is delivered).
    await c.get(P(core.GetRequest, { setId: v.setId, ioasid: v.ioasid, holder: KVM, generation: v.generation }));
    await c.free(P(core.FreeRequest, { setId: v.setId, ioasid: v.ioasid, generation: v.generation }));
    await waitFor(async () => (await stateOf(v.deviceId)).devices[0]!.pasidEntries.every((e) => e.withoutPasid), {
      message: "the FREE tears the replaced attachment down",
    });
    expect((await stateOf(v.deviceId)).iotlbFlushes.at(-1)).toMatchObject({ cause: iommu.IotlbFlushCause.IOTLB_FLUSH_CAUSE_IOASID_FREE, domainId: v.stage2 });
    await c.put(P(core.PutRequest, { setId: v.setId, ioasid: v.ioasid, holder: KVM, generation: v.generation }));
    await expectConsistent(v.deviceId);
  });

  it("replaces a VM's device's domain without PASID (stage 2 → nested over it → another paging domain)", async () => {
    const { iommu: client } = stack;
    const v = await vm();
    const n = await nested(v.stage2, 0x8000n);
    const p = await paging();
    const replace = (domainId: number) =>
      client.replaceDomain(P(iommu.ReplaceDomainRequest, { domainId, deviceId: v.deviceId, withoutPasid: true, owner: "vfio/vfio-1" }));
    expect((await replace(n)).replacedDomainId).toBe(v.stage2);
    expect((await replace(p)).replacedDomainId).toBe(n);
    const s = await stateOf(v.deviceId);
    expect(s.devices[0]!.pasidEntries.find((e) => e.withoutPasid)).toMatchObject({ domainId: p, domainType: iommu.DomainType.DOMAIN_TYPE_PAGING });
    expect(s.iotlbFlushes.at(-1)).toMatchObject({
      cause: iommu.IotlbFlushCause.IOTLB_FLUSH_CAUSE_REPLACE,
      scope: iommu.IotlbFlushScope.IOTLB_FLUSH_SCOPE_DOMAIN,
      domainId: n,
    });
    await expectConsistent(v.deviceId);
  });

  it("refuses an unattached target, an SVA domain, a guest bind's or SVA bond's entry, the wrong old domain or generation, and an IOASID that is gone — changing nothing", async () => {
    const { c, iommu: client } = stack;
    const v = await vm();
    const p = await paging();
    const replace = (extra: object) => client.replaceDomain(P(iommu.ReplaceDomainRequest, { domainId: p, deviceId: v.deviceId, owner: OWNER, ...extra }));

    const before = await stateOf(v.deviceId);
    // iommufd: replacing what is not attached is -EINVAL.
    await expectRefused(replace({ pasid: v.ioasid, generation: v.generation }), Code.INVALID_ARGUMENT, "PASID_NOT_ATTACHED");
    await expectRefused(replace({ pasid: 0 }), Code.INVALID_ARGUMENT, "PASID_ZERO_RESERVED");
    await expectRefused(replace({ domainId: 999_999, pasid: v.ioasid }), Code.NOT_FOUND, "DOMAIN_NOT_FOUND");
    await expectRefused(replace({ deviceId: "0000:ff:1f.7", pasid: v.ioasid }), Code.NOT_FOUND, "DEVICE_NOT_FOUND");
    await expectRefused(replace({ withoutPasid: true, generation: 3 }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    expect(await stateOf(v.deviceId)).toEqual(before);

    // A guest bind's entry is UnbindGpasid's to undo, not replace's.
    await client.bindGpasid(
      P(iommu.BindGpasidRequest, {
        setId: v.setId,
        hpasid: v.ioasid,
        generation: v.generation,
        gpasid: 5,
        deviceId: v.deviceId,
        guestPgtable: 0x7000n,
        owner: OWNER,
      }),
    );
    // …and an SVA bond's entry SvaUnbind's.
    const bond = (await client.svaBind(P(iommu.SvaBindRequest, { deviceId: v.deviceId, mmToken: 0x5151n + nextToken, owner: OWNER }))).bond!;
    const bound = await stateOf(v.deviceId);
    await expectRefused(replace({ pasid: v.ioasid }), Code.FAILED_PRECONDITION, "DOMAIN_MISMATCH");
    await expectRefused(replace({ pasid: bond.pasid }), Code.FAILED_PRECONDITION, "DOMAIN_MISMATCH");
    expect(await stateOf(v.deviceId)).toEqual(bound);
    await client.releaseMm({ mmToken: bond.mmToken });
    expect((await c.describe({ ioasid: bond.pasid }).catch(() => undefined))?.info, "the mm's PASID freed with the mm").toBeUndefined();
    await client.unbindGpasid(P(iommu.UnbindGpasidRequest, { setId: v.setId, hpasid: v.ioasid, generation: v.generation, deviceId: v.deviceId }));

    // An attachment of the IOASID's generation.
    const q = await paging();
    await client.attachDomain(P(iommu.AttachDomainRequest, { domainId: q, deviceId: v.deviceId, pasid: v.ioasid, generation: v.generation, owner: OWNER }));
    const sva = (await client.createDomain(P(iommu.CreateDomainRequest, { type: iommu.DomainType.DOMAIN_TYPE_SVA, mmToken: 0xabcn }))).domain!.domainId;
    const attachedState = await stateOf(v.deviceId);
    await expectRefused(replace({ domainId: sva, pasid: v.ioasid }), Code.FAILED_PRECONDITION, "DOMAIN_INCOMPATIBLE");
    await expectRefused(replace({ pasid: v.ioasid, oldDomainId: p }), Code.FAILED_PRECONDITION, "DOMAIN_MISMATCH");
    await expectRefused(replace({ pasid: v.ioasid, generation: v.generation + 1 }), Code.FAILED_PRECONDITION, "STALE_GENERATION");
    expect(await stateOf(v.deviceId)).toEqual(attachedState);

    // An unchecked attachment at a PASID that is no allocated IOASID: replacing it as an IOASID's is refused.
    const unallocated = v.ioasid + 50_000;
    await client.attachDomain(P(iommu.AttachDomainRequest, { domainId: q, deviceId: v.deviceId, pasid: unallocated, owner: OWNER }));
    const unchecked = await stateOf(v.deviceId);
    await expectRefused(replace({ pasid: unallocated, generation: 1 }), Code.NOT_FOUND, "IOASID_NOT_FOUND");
    expect(await stateOf(v.deviceId)).toEqual(unchecked);
    // …and replaced unchecked, it stays nobody's IOASID.
    expect((await replace({ pasid: unallocated })).handle!.generation).toBe(0);
    await expectConsistent(v.deviceId);
  });
});

/**
 * Calls `op` with failure point n = 1, 2, … armed until a call succeeds. After every injected
 * failure, `afterFailure(n)` checks what must hold. @returns how many failure points failed
 */
async function walk(operation: iommu.FailureInjectionOperation, op: () => Promise<unknown>, afterFailure: (n: number) => Promise<void>): Promise<number> {
  for (let n = 1; n <= 20; n++) {
    await stack.iommu.injectFailure({ operation, nth: n });
    try {
      await op();
      return n - 1;
    } catch (err) {
      expect(err, `failure point ${n}`).toBeInstanceOf(DomainError);
      expect([(err as DomainError).code, (err as DomainError).reason], `failure point ${n}: ${(err as Error).message}`).toEqual([
        Code.RESOURCE_EXHAUSTED,
        "FAULT_INJECTED",
      ]);
      await afterFailure(n);
    }
  }
  throw new Error(`${operation}: still failing at failure point 20`);
}

describe("iommu: failure injection (fail-nth) over attach → replace → detach and bind → unbind", () => {
  it("leaves the tables, handles, references and fault queues as they were after every failure point, then succeeds and tears down cleanly", async () => {
    const { c, iommu: client } = stack;
    const v = await vm();
    const p = await paging();
    const n = await nested(p);
    const target = { deviceId: v.deviceId, pasid: v.ioasid, generation: v.generation, owner: OWNER };
    const coreView = async () => (await c.describe({ ioasid: v.ioasid })).info;

    // Attach: every failure point leaves nothing attached.
    let before = await stateOf(v.deviceId);
    let coreBefore = await coreView();
    const attachPoints = await walk(
      OP.FAILURE_INJECTION_OPERATION_ATTACH,
      () => client.attachDomain(P(iommu.AttachDomainRequest, { domainId: p, ...target })),
      async () => {
        expect(await stateOf(v.deviceId)).toEqual(before);
        expect(await coreView()).toEqual(coreBefore);
        await expectConsistent(v.deviceId);
      },
    );
    expect(attachPoints, "an attach with a generation: the core's check and the handle's allocation").toBe(2);

    // Replace with a fault outstanding on the old attachment: every failure point leaves the old
    // domain attached and the fault pending.
    const h = faultHandler();
    const group = await pendingGroup(h, v.deviceId, v.ioasid, 0x60000n);
    before = await stateOf(v.deviceId);
    coreBefore = await coreView();
    const replacePoints = await walk(
      OP.FAILURE_INJECTION_OPERATION_REPLACE,
      () => client.replaceDomain(P(iommu.ReplaceDomainRequest, { domainId: n, ...target })),
      async () => {
        const s = await stateOf(v.deviceId);
        expect(s).toEqual(before);
        expect(s.devices[0]!.pasidEntries.find((e) => e.pasid === v.ioasid)!.domainId, "the old domain stays attached").toBe(p);
        expect(
          s.faultGroups.map((g) => g.faultGroupId),
          "the old attachment's fault still pending",
        ).toEqual([group]);
        expect(await coreView()).toEqual(coreBefore);
        await expectConsistent(v.deviceId);
      },
    );
    expect(replacePoints).toBe(2);
    expect(await client.awaitPageResponse({ deviceId: v.deviceId, faultGroupId: group })).toMatchObject({
      source: iommu.PageResponseSource.PAGE_RESPONSE_SOURCE_REPLACE,
    });
    h.stop();

    // Detach: its one failure point (the core's generation check of an unchecked attach does not
    // apply here: the attachment carries its generation) — a detach with no points succeeds at n=1.
    const detachPoints = await walk(
      OP.FAILURE_INJECTION_OPERATION_DETACH,
      () => client.detachDomain(P(iommu.DetachDomainRequest, { domainId: n, deviceId: v.deviceId, pasid: v.ioasid, generation: v.generation })),
      () => Promise.reject(new Error("a detach of a generation-checked attachment has no failure point")),
    );
    expect(detachPoints).toBe(0);
    await expectConsistent(v.deviceId);
    expect((await stateOf(v.deviceId)).devices[0]!.pasidEntries.filter((e) => !e.withoutPasid)).toEqual([]);
    expect(await coreView()).toEqual(coreBefore);

    // Bind: after every failure point, no entry, no reference, no SPID and no event — what was
    // taken at the core before the failure (the reference, the SPID) was given back.
    const from = await nextSeq(c);
    const bind = () =>
      client.bindGpasid(
        P(iommu.BindGpasidRequest, {
          setId: v.setId,
          hpasid: v.ioasid,
          generation: v.generation,
          gpasid: 9,
          deviceId: v.deviceId,
          guestPgtable: 0x7000n,
          owner: OWNER,
        }),
      );
    before = await stateOf(v.deviceId);
    const failedBinds: string[][] = [];
    const bindPoints = await walk(OP.FAILURE_INJECTION_OPERATION_BIND, bind, async () => {
      const s = await stateOf(v.deviceId);
      expect(s.devices).toEqual(before.devices);
      expect(s.attachHandles).toEqual(before.attachHandles);
      expect(s.domains, "no implicit nested domain left behind").toEqual(before.domains);
      expect(await coreView()).toMatchObject({ refcount: coreBefore!.refcount, spid: 0 });
      expect((await holdersOf(c, v.ioasid))!["iommu/dmar0/bind"], "the bind reference given back").toBeUndefined();
      failedBinds.push(await eventsOf(c, from, v.ioasid));
      await expectConsistent(v.deviceId);
    });
    // core Find, GetSet (the VM check), Get (the reference), AttachSpid, the nested domain, the handle.
    expect(bindPoints).toBe(6);
    // A failure after the SPID was attached detaches it again: a BIND is then followed by its UNBIND.
    for (const evs of failedBinds) expect(evs.filter((e) => e === "BIND").length).toBe(evs.filter((e) => e === "UNBIND").length);
    expect((await coreView())!.spid).toBe(9);
    expect((await holdersOf(c, v.ioasid))!["iommu/dmar0/bind"]).toBe(1);
    await expectConsistent(v.deviceId);

    // Unbind (the last device): its failure point is the SPID detach at the core, after the entry
    // was torn down; the entry stays gone and the SPID attached, and the next unbind finishes it.
    const since = await nextSeq(c);
    const unbind = () =>
      client.unbindGpasid(P(iommu.UnbindGpasidRequest, { setId: v.setId, hpasid: v.ioasid, generation: v.generation, deviceId: v.deviceId }));
    let finished: iommu.UnbindGpasidResponse | undefined;
    const unbindPoints = await walk(
      OP.FAILURE_INJECTION_OPERATION_UNBIND,
      async () => {
        finished = await unbind();
      },
      async () => {
        expect((await stateOf(v.deviceId)).devices[0]!.pasidEntries.filter((e) => !e.withoutPasid)).toEqual([]);
        expect((await coreView())!.spid, "the SPID detach did not happen").toBe(9);
        expect(await eventsOf(c, since, v.ioasid)).toEqual([]);
        await expectConsistent(v.deviceId);
      },
    );
    expect(unbindPoints).toBe(1);
    expect(finished).toMatchObject({ unbound: false });
    expect((await coreView())!.spid, "the retry finished the detach").toBe(0);
    expect(await eventsOf(c, since, v.ioasid)).toEqual(["UNBIND"]);
    // The IOMMU keeps its reference until the FREE (ioasid.rst steps 22–23), which then reclaims.
    expect((await holdersOf(c, v.ioasid))!["iommu/dmar0/bind"]).toBe(1);
    await c.free(P(core.FreeRequest, { setId: v.setId, ioasid: v.ioasid, generation: v.generation }));
    await waitFor(async () => (await c.describe({ ioasid: v.ioasid }).catch(() => undefined))?.info === undefined, {
      message: "the IOASID reclaimed once the FREE reached the IOMMU",
    });
    await expectConsistent(v.deviceId);
  });

  it("arms only what it is asked, and only once", async () => {
    const { iommu: client } = stack;
    await expectRefused(client.injectFailure({ operation: OP.FAILURE_INJECTION_OPERATION_UNSPECIFIED, nth: 1 }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await expectRefused(client.injectFailure({ operation: OP.FAILURE_INJECTION_OPERATION_ATTACH, nth: 0 }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    const deviceId = newDevice();
    await devicesWithStage2(client, deviceId);
    const p = await paging();
    // Armed for REPLACE: an attach is not affected, and the arming is used up by the next replace.
    await client.injectFailure({ operation: OP.FAILURE_INJECTION_OPERATION_REPLACE, nth: 1 });
    await client.attachDomain(P(iommu.AttachDomainRequest, { domainId: p, deviceId, pasid: 3, owner: OWNER }));
    const replace = () => client.replaceDomain(P(iommu.ReplaceDomainRequest, { domainId: p, deviceId, pasid: 3, owner: OWNER }));
    // Same domain: no failure point reached, and the arming is gone all the same.
    await replace();
    const q = await paging();
    expect((await client.replaceDomain(P(iommu.ReplaceDomainRequest, { domainId: q, deviceId, pasid: 3, owner: OWNER }))).replacedDomainId).toBe(p);
  });
});

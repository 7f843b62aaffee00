import { spawn, type ChildProcess } from "node:child_process";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { eventOf, readHistory, type HistoryRecord } from "@ioasid/bus";
import { Code } from "@ioasid/errors";
import { decodeVfioCapability } from "@ioasid/grpc-kit";
import { core, iommu, kvm, vdcm, vfio } from "@ioasid/proto";
import { continueProcess, stopProcess, waitFor } from "@ioasid/testkit";
import { expectRefused } from "../support/core-fixture.js";
import { startStack, type StackFixture } from "../support/stack-fixture.js";
import {
  attachSession,
  CODE,
  GPA_BASE,
  GVA_BASE,
  isReclaimed,
  OUTCOME,
  PAGE,
  SOURCE,
  dma,
  gpaOf,
  guestAnswers,
  openGuest,
  registerDevice,
  watchFaults,
} from "../support/fault-fixture.js";

// IO page faults end to end (DESIGN §5 "Faults", §7 S7/L3) through the real services: a device's
// DMA misses at the IOMMU, the page-request group is routed through the attach handle to VFIO,
// relayed to the VMM's WatchFaults, answered by the guest, and the device's retry completes; and
// every way a group can end gets exactly one response.

const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);
const cli = fileURLToPath(new URL("../../packages/cli/dist/main.js", import.meta.url));
/** The IOMMU answers unanswered groups INVALID after this long (short, for the timeout test). */
const FAULT_TIMEOUT_MS = 2000;

let stack: StackFixture;
let nc: NatsConnection;
const children: ChildProcess[] = [];
beforeAll(async () => {
  stack = await startStack({ IOMMU_FAULT_TIMEOUT: `${FAULT_TIMEOUT_MS}ms` });
  nc = await connect({ servers: stack.nats.url });
}, 60_000);
afterAll(async () => {
  for (const ch of children) ch.kill("SIGKILL");
  await nc?.close();
  await stack?.stop();
});

let tokens = 0xfa00n;
const nextToken = () => ++tokens;

/** The IOMMU's page_response history records of a group. */
async function responsesOf(groupIds: readonly bigint[], since: number): Promise<Map<bigint, HistoryRecord[]>> {
  const hist = await readHistory(nc, { sinceMs: since });
  const out = new Map<bigint, HistoryRecord[]>(groupIds.map((id) => [id, []]));
  for (const r of hist) {
    if (r.role !== "iommu" || r.action.$case !== "pageResponse") continue;
    out.get(r.action.value.group)?.push(r);
  }
  return out;
}

const awaitResponse = (deviceId: string, faultGroupId: bigint) => stack.clients.iommu.awaitPageResponse({ deviceId, faultGroupId }, { deadlineMs: 10_000 });

describe("page requests routed to the guest", () => {
  it("answers a three-request group once, after its last request, and the device's retry completes", async () => {
    const c = stack.clients;
    const since = Date.now() - 1;
    await registerDevice(c, "pf-a");
    const g = await openGuest(c, nextToken(), "pf-a");
    const w = await watchFaults(c, g.containerId);
    const gvas = [0n, 1n, 2n].map((i) => GVA_BASE + i * PAGE + 0x10n);

    const r1 = await dma(c, "pf-a", g.hpasid, gvas[0]!, { prgi: 3, last: false });
    const r2 = await dma(c, "pf-a", g.hpasid, gvas[1]!, { prgi: 3, last: false });
    expect(r1).toMatchObject({ outcome: OUTCOME.TRANSLATE_OUTCOME_PAGE_REQUEST, groupComplete: false });
    expect(r2).toMatchObject({ outcome: OUTCOME.TRANSLATE_OUTCOME_PAGE_REQUEST, groupComplete: false, faultGroupId: r1.faultGroupId });
    // Non-last requests wait on the partial list: nothing reaches the guest, an answer is refused.
    const partial = (await c.iommu.queryState(P(iommu.QueryStateRequest, { deviceIds: ["pf-a"] }))).faultGroups;
    expect(partial.map((f) => [f.faultGroupId, f.state, f.requests.length])).toEqual([[r1.faultGroupId, iommu.FaultGroupState.FAULT_GROUP_STATE_PARTIAL, 2]]);
    await new Promise((r) => setTimeout(r, 100));
    expect(w.groups()).toEqual([]);
    await expectRefused(
      c.iommu.sendPageResponse({ owner: "vfio/vfio-1", faultGroupId: r1.faultGroupId, code: CODE.PAGE_RESPONSE_CODE_SUCCESS, noHandler: false }),
      Code.FAILED_PRECONDITION,
      "FAULT_GROUP_INCOMPLETE",
    );

    const r3 = await dma(c, "pf-a", g.hpasid, gvas[2]!, { prgi: 3, last: true });
    expect(r3).toMatchObject({ outcome: OUTCOME.TRANSLATE_OUTCOME_PAGE_REQUEST, groupComplete: true, faultGroupId: r1.faultGroupId });
    const device = awaitResponse("pf-a", r1.faultGroupId);
    await waitFor(() => w.groups().length === 1, { message: "the group relayed to the VMM" });
    const group = w.groups()[0]!;
    expect(group).toMatchObject({ faultGroupId: r1.faultGroupId, hpasid: g.hpasid, gpasid: g.gpasid, prgi: 3 });
    expect(group.requests.map((r) => [r.address, r.lastRequest])).toEqual([
      [GVA_BASE, false],
      [GVA_BASE + PAGE, false],
      [GVA_BASE + 2n * PAGE, true],
    ]);

    await guestAnswers(c, g, group);
    expect(await device).toEqual({ code: CODE.PAGE_RESPONSE_CODE_SUCCESS, source: SOURCE.PAGE_RESPONSE_SOURCE_HANDLER });
    for (const gva of gvas) {
      // GVA page → GPA page (the guest's first stage) → HPA (the VM's stage 2), offset kept.
      expect(await dma(c, "pf-a", g.hpasid, gva)).toMatchObject({
        outcome: OUTCOME.TRANSLATE_OUTCOME_TRANSLATED,
        outputAddress: g.hpaBase + (gpaOf(gva) - GPA_BASE),
      });
    }
    // Exactly one response: the second answer is refused and changes nothing.
    await expectRefused(
      c.vfio.sendPageResponse({ containerId: g.containerId, faultGroupId: group.faultGroupId, code: vfio.PageResponseCode.PAGE_RESPONSE_CODE_INVALID }),
      Code.FAILED_PRECONDITION,
      "FAULT_GROUP_ALREADY_RESPONDED",
    );
    expect(await awaitResponse("pf-a", r1.faultGroupId)).toMatchObject({ code: CODE.PAGE_RESPONSE_CODE_SUCCESS });
    await waitFor(() => w.answered().length === 1);
    expect(w.answered()).toEqual([
      { faultGroupId: group.faultGroupId, code: vfio.PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS, source: "PAGE_RESPONSE_SOURCE_HANDLER" },
    ]);
    await waitFor(async () => (await responsesOf([group.faultGroupId], since)).get(group.faultGroupId)!.length === 1, {
      message: "the response in the history",
    });
    w.stop();
    g.session.abort();
  });

  it("translates through the guest's first stage and the VM's stage 2 to the host address", async () => {
    const c = stack.clients;
    await registerDevice(c, "pf-t");
    const g = await openGuest(c, nextToken(), "pf-t");
    const gva = GVA_BASE + 0x40_0000n;
    await c.vfio.mapGuestPages(
      P(vfio.MapGuestPagesRequest, { containerId: g.containerId, hpasid: g.hpasid, iova: gva, gpa: 0x1000_3000n, size: PAGE, access: { read: true } }),
    );
    expect(await dma(c, "pf-t", g.hpasid, gva + 0x24n)).toMatchObject({ outcome: OUTCOME.TRANSLATE_OUTCOME_TRANSLATED, outputAddress: g.hpaBase + 0x3024n });
    // The VMM takes that guest page out of its stage 2 (VFIO UnmapDma): a stage-2 miss is a fault, never a page request.
    expect((await c.vfio.unmapDma({ containerId: g.containerId, iova: 0x1000_3000n, size: PAGE })).unmappedSize).toBe(PAGE);
    expect(await dma(c, "pf-t", g.hpasid, gva)).toMatchObject({
      outcome: OUTCOME.TRANSLATE_OUTCOME_FAULT,
      faultReason: iommu.FaultReason.FAULT_REASON_NOT_PRESENT,
    });
    await c.vfio.mapDma(
      P(vfio.MapDmaRequest, { containerId: g.containerId, iova: 0x1000_3000n, paddr: g.hpaBase + 0x3000n, size: PAGE, access: { read: true, write: true } }),
    );
    await expectRefused(
      c.vfio.mapDma(P(vfio.MapDmaRequest, { containerId: g.containerId, iova: 0x1000_3000n, paddr: g.hpaBase, size: PAGE, access: { read: true } })),
      Code.ALREADY_EXISTS,
      "IOVA_ALREADY_MAPPED",
    );
    // Another guest cannot touch this guest's page table.
    await registerDevice(c, "pf-t2");
    const other = await openGuest(c, nextToken(), "pf-t2");
    await expectRefused(
      c.vfio.mapGuestPages(
        P(vfio.MapGuestPagesRequest, {
          containerId: other.containerId,
          hpasid: g.hpasid,
          iova: gva + PAGE,
          gpa: 0x1000_4000n,
          size: PAGE,
          access: { read: true },
        }),
      ),
      Code.PERMISSION_DENIED,
      "IOASID_NOT_IN_SET",
    );
    g.session.abort();
    other.session.abort();
  });
});

describe("a VDCM work queue's DMA", () => {
  it("raises a page request from an mdev's descriptor; after the guest's answer the resubmitted descriptor completes", async () => {
    const c = stack.clients;
    await c.vdcm.registerDevice(
      P(vdcm.RegisterDeviceRequest, { deviceId: "dsa-f", maxPasidEntries: 16, wqs: [{ wqId: 0, mode: vdcm.WqMode.WQ_MODE_DEDICATED, size: 8 }] }),
    );
    await registerDevice(c, "dsa-f");
    await c.vdcm.createMdev(P(vdcm.CreateMdevRequest, { parentDeviceId: "dsa-f", mdevUuid: "mdev-fault", wqIds: [0] }));
    const token = nextToken();
    const opened = await c.vfio.openContainer(P(vfio.OpenContainerRequest, { mmToken: token, quota: 8, vmName: "dsa-guest" }));
    const session = await attachSession(c, opened.containerId);
    const mdev = { ref: { $case: "mdevUuid" as const, value: "mdev-fault" } };
    await c.vfio.assignDevice(P(vfio.AssignDeviceRequest, { containerId: opened.containerId, device: mdev }));
    const a = await c.vfio.allocPasid({ containerId: opened.containerId });
    await c.vfio.bindGuestPasid(
      P(vfio.BindGuestPasidRequest, {
        containerId: opened.containerId,
        device: mdev,
        hpasid: a.hpasid,
        generation: a.generation,
        gpasid: 77,
        guestPgtable: 0x5000n,
      }),
    );
    await c.vdcm.writeWqPasid(P(vdcm.WriteWqPasidRequest, { mdevUuid: "mdev-fault", virtualWq: 0, gpasid: 77 }));
    // The VMM maps guest RAM into the VM's stage 2 (the second stage of the mdev's nested entry).
    await c.vfio.mapDma(
      P(vfio.MapDmaRequest, {
        containerId: opened.containerId,
        iova: GPA_BASE,
        paddr: opened.guestMemory[0]!.paddr,
        size: 0x10_0000n,
        access: { read: true, write: true },
      }),
    );
    const w = await watchFaults(c, opened.containerId);

    const fill = P(vdcm.SubmitDescriptorRequest, {
      mdevUuid: "mdev-fault",
      virtualWq: 0,
      descriptor: { op: vdcm.DescriptorOp.DESCRIPTOR_OP_FILL, dstAddress: GVA_BASE + 0x100n, size: 256n },
    });
    const first = await c.vdcm.submitDescriptor(fill);
    expect(first).toMatchObject({ status: vdcm.CompletionStatus.COMPLETION_STATUS_PAGE_REQUEST, faultAddress: GVA_BASE + 0x100n, bytesCompleted: 0n });
    await waitFor(() => w.groups().length === 1, { message: "the descriptor's page request at the VMM" });
    const group = w.groups()[0]!;
    expect(group).toMatchObject({ faultGroupId: first.faultGroupId, hpasid: a.hpasid, gpasid: 77, device: mdev });
    await c.vfio.mapGuestPages(
      P(vfio.MapGuestPagesRequest, {
        containerId: opened.containerId,
        hpasid: a.hpasid,
        iova: GVA_BASE,
        gpa: GPA_BASE,
        size: PAGE,
        access: { read: true, write: true },
      }),
    );
    await c.vfio.sendPageResponse({
      containerId: opened.containerId,
      faultGroupId: group.faultGroupId,
      code: vfio.PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS,
    });
    expect(await awaitResponse("dsa-f", first.faultGroupId)).toMatchObject({ code: CODE.PAGE_RESPONSE_CODE_SUCCESS });
    expect(await c.vdcm.submitDescriptor(fill)).toMatchObject({ status: vdcm.CompletionStatus.COMPLETION_STATUS_SUCCESS, bytesCompleted: 256n });
    w.stop();
    session.abort();
  });
});

describe("every group gets exactly one response", () => {
  it("answers both outstanding groups INVALID when the guest unbinds (handle teardown), and refuses the guest's later answer", async () => {
    const c = stack.clients;
    await registerDevice(c, "pf-b");
    const g = await openGuest(c, nextToken(), "pf-b");
    const w = await watchFaults(c, g.containerId);
    const a = await dma(c, "pf-b", g.hpasid, GVA_BASE + 0x10_0000n);
    const b = await dma(c, "pf-b", g.hpasid, GVA_BASE + 0x20_0000n, { prgi: 7, last: false });
    await waitFor(() => w.groups().length === 1);
    await c.vfio.unbindGuestPasid(
      P(vfio.UnbindGuestPasidRequest, {
        containerId: g.containerId,
        device: { ref: { $case: "deviceId", value: "pf-b" } },
        hpasid: g.hpasid,
        generation: g.generation,
      }),
    );
    for (const id of [a.faultGroupId, b.faultGroupId]) {
      expect(await awaitResponse("pf-b", id)).toEqual({ code: CODE.PAGE_RESPONSE_CODE_INVALID, source: SOURCE.PAGE_RESPONSE_SOURCE_DETACH });
    }
    await expectRefused(
      c.vfio.sendPageResponse({ containerId: g.containerId, faultGroupId: a.faultGroupId, code: vfio.PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS }),
      Code.FAILED_PRECONDITION,
      "FAULT_GROUP_ALREADY_RESPONDED",
    );
    await waitFor(() => w.answered().length === 1, { message: "the relayed group's answer reaches the VMM" });
    expect(w.answered()[0]).toMatchObject({ faultGroupId: a.faultGroupId, source: "PAGE_RESPONSE_SOURCE_DETACH" });
    expect((await c.iommu.queryState(P(iommu.QueryStateRequest, { deviceIds: ["pf-b"] }))).faultGroups).toEqual([]);
    w.stop();
    g.session.abort();
  });

  it("answers a DetachDomain's groups INVALID and only that handle's; a group nobody handles FAILURE; a removed device's complete groups INVALID, its partial ones freed unanswered", async () => {
    const c = stack.clients;
    await registerDevice(c, "pf-c");
    const domain = (await c.iommu.createDomain(P(iommu.CreateDomainRequest, { type: iommu.DomainType.DOMAIN_TYPE_PAGING }))).domain!.domainId;
    for (const pasid of [11, 12])
      await c.iommu.attachDomain(P(iommu.AttachDomainRequest, { domainId: domain, deviceId: "pf-c", pasid, owner: "test/handler" }));
    await c.iommu.attachDomain(P(iommu.AttachDomainRequest, { domainId: domain, deviceId: "pf-c", pasid: 13, owner: "test/nobody" }));
    const seen: iommu.SubscribeFaultGroupsResponse[] = [];
    const ac = new AbortController();
    const stream = (async () => {
      try {
        for await (const m of c.iommu.subscribeFaultGroups({ owner: "test/handler" }, { signal: ac.signal })) seen.push(m);
      } catch {
        /* aborted */
      }
    })();
    // Give the stream time to open (a group completed before would be answered FAILURE: no handler).
    await new Promise((r) => setTimeout(r, 300));
    const x = await dma(c, "pf-c", 11, 0x1000n);
    const y = await dma(c, "pf-c", 11, 0x2000n);
    const z = await dma(c, "pf-c", 12, 0x3000n);
    await waitFor(() => seen.filter((m) => m.item?.$case === "group").length === 3, { message: "three groups at the handler" });
    const detached = await c.iommu.detachDomain(P(iommu.DetachDomainRequest, { domainId: domain, deviceId: "pf-c", pasid: 11 }));
    expect(detached.answeredFaultGroups).toBe(2);
    for (const id of [x.faultGroupId, y.faultGroupId]) expect(await awaitResponse("pf-c", id)).toMatchObject({ source: SOURCE.PAGE_RESPONSE_SOURCE_DETACH });
    // The other handle's group is untouched until its handler answers.
    expect((await c.iommu.queryState(P(iommu.QueryStateRequest, { deviceIds: ["pf-c"] }))).faultGroups.map((f) => f.faultGroupId)).toEqual([z.faultGroupId]);
    await c.iommu.sendPageResponse({ owner: "test/handler", faultGroupId: z.faultGroupId, code: CODE.PAGE_RESPONSE_CODE_INVALID, noHandler: false });
    await expectRefused(
      c.iommu.sendPageResponse({ owner: "test/other", faultGroupId: z.faultGroupId, code: CODE.PAGE_RESPONSE_CODE_SUCCESS, noHandler: false }),
      Code.PERMISSION_DENIED,
      "FAULT_GROUP_NOT_OWNED",
    );
    await expectRefused(
      c.iommu.sendPageResponse({ owner: "test/handler", faultGroupId: 987654n, code: CODE.PAGE_RESPONSE_CODE_SUCCESS, noHandler: false }),
      Code.NOT_FOUND,
      "FAULT_GROUP_NOT_FOUND",
    );
    // No stream for the owner: answered FAILURE at once (no handler).
    const lone = await dma(c, "pf-c", 13, 0x4000n);
    expect(await awaitResponse("pf-c", lone.faultGroupId)).toEqual({ code: CODE.PAGE_RESPONSE_CODE_FAILURE, source: SOURCE.PAGE_RESPONSE_SOURCE_NO_HANDLER });
    // Device removal answers every complete group of the device INVALID; a partial group (its last
    // request never came) is freed without a response (io-pgfault since v6.9, DESIGN §5).
    const u = await dma(c, "pf-c", 12, 0x5000n);
    const v = await dma(c, "pf-c", 12, 0x6000n, { prgi: 30, last: false });
    const waiting = awaitResponse("pf-c", u.faultGroupId);
    expect((await c.iommu.removeDevice({ deviceId: "pf-c" })).answeredFaultGroups).toBe(1);
    expect(await waiting).toEqual({ code: CODE.PAGE_RESPONSE_CODE_INVALID, source: SOURCE.PAGE_RESPONSE_SOURCE_DEVICE_REMOVED });
    await waitFor(() => seen.some((m) => m.item?.$case === "answered" && m.item.value.faultGroupId === u.faultGroupId), {
      message: "the complete group's answer at the handler",
    });
    expect(seen.some((m) => m.item?.$case === "answered" && m.item.value.faultGroupId === v.faultGroupId)).toBe(false);
    // Forgotten, not answered: an answer to it finds no group (an answered one is ALREADY_RESPONDED).
    await expectRefused(
      c.iommu.sendPageResponse({ owner: "test/handler", faultGroupId: v.faultGroupId, code: CODE.PAGE_RESPONSE_CODE_INVALID, noHandler: false }),
      Code.NOT_FOUND,
      "FAULT_GROUP_NOT_FOUND",
    );
    await expectRefused(
      c.iommu.sendPageResponse({ owner: "test/handler", faultGroupId: u.faultGroupId, code: CODE.PAGE_RESPONSE_CODE_SUCCESS, noHandler: false }),
      Code.FAILED_PRECONDITION,
      "FAULT_GROUP_ALREADY_RESPONDED",
    );
    ac.abort();
    await stream;
  });

  it("answers FAILURE (no handler) a guest's group when its VMM has no WatchFaults open", async () => {
    const c = stack.clients;
    await registerDevice(c, "pf-n");
    const g = await openGuest(c, nextToken(), "pf-n");
    const r = await dma(c, "pf-n", g.hpasid, GVA_BASE + 0x7000n);
    expect(await awaitResponse("pf-n", r.faultGroupId)).toEqual({ code: CODE.PAGE_RESPONSE_CODE_FAILURE, source: SOURCE.PAGE_RESPONSE_SOURCE_NO_HANDLER });
    g.session.abort();
  });

  it("answers INVALID a group nobody answers before the timeout; the late answer is refused", async () => {
    const c = stack.clients;
    await registerDevice(c, "pf-e");
    const g = await openGuest(c, nextToken(), "pf-e");
    const w = await watchFaults(c, g.containerId);
    const t0 = Date.now();
    const r = await dma(c, "pf-e", g.hpasid, GVA_BASE + 0x30_0000n);
    expect(await awaitResponse("pf-e", r.faultGroupId)).toEqual({ code: CODE.PAGE_RESPONSE_CODE_INVALID, source: SOURCE.PAGE_RESPONSE_SOURCE_TIMEOUT });
    expect(Date.now() - t0).toBeGreaterThanOrEqual(FAULT_TIMEOUT_MS - 50);
    await waitFor(() => w.answered().length === 1);
    await expectRefused(
      c.vfio.sendPageResponse({ containerId: g.containerId, faultGroupId: r.faultGroupId, code: vfio.PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS }),
      Code.FAILED_PRECONDITION,
      "FAULT_GROUP_ALREADY_RESPONDED",
    );
    w.stop();
    g.session.abort();
  });

  it("bounds outstanding requests by the device's credits without stalling it", async () => {
    const c = stack.clients;
    await registerDevice(c, "pf-f", { priCredits: 2 });
    const g = await openGuest(c, nextToken(), "pf-f");
    const w = await watchFaults(c, g.containerId);
    const a = await dma(c, "pf-f", g.hpasid, GVA_BASE + 0x1000n);
    const partial = await dma(c, "pf-f", g.hpasid, GVA_BASE + 0x2000n, { prgi: 40, last: false });
    // Over the limit: not queued, and the partial group it belonged to is answered INVALID at once.
    const over = await dma(c, "pf-f", g.hpasid, GVA_BASE + 0x3000n, { prgi: 40, last: true });
    expect(over).toMatchObject({
      outcome: OUTCOME.TRANSLATE_OUTCOME_FAULT,
      faultReason: iommu.FaultReason.FAULT_REASON_PRI_CREDITS_EXHAUSTED,
      faultGroupId: partial.faultGroupId,
    });
    expect(await awaitResponse("pf-f", partial.faultGroupId)).toEqual({
      code: CODE.PAGE_RESPONSE_CODE_INVALID,
      source: SOURCE.PAGE_RESPONSE_SOURCE_CREDITS_EXHAUSTED,
    });
    await waitFor(() => w.groups().length === 1);
    await guestAnswers(c, g, w.groups()[0]!);
    expect(await awaitResponse("pf-f", a.faultGroupId)).toMatchObject({ code: CODE.PAGE_RESPONSE_CODE_SUCCESS });
    // Credits came back with the answers.
    expect((await dma(c, "pf-f", g.hpasid, GVA_BASE + 0x5000n)).outcome).toBe(OUTCOME.TRANSLATE_OUTCOME_PAGE_REQUEST);
    w.stop();
    g.session.abort();
  });

  it("answers every outstanding group INVALID when the VMM is killed, and reclaims its IOASIDs", async () => {
    const c = stack.clients;
    await registerDevice(c, "pf-k");
    const token = nextToken();
    // The VMM's certificate (the stack has mTLS): VMMs reach VFIO only.
    const vmmCredentials = (await stack.nats.certificateDir({ role: "vmm", instance: "killed" })) ?? "";
    const vmm = spawn(process.execPath, [cli, "vmm-agent", "--vfio", stack.addresses.vfio, "--token", String(token), "--quota", "8", "--name", "killed"], {
      stdio: ["ignore", "pipe", "inherit"],
      env: { ...process.env, IOASID_CREDENTIALS_DIR: vmmCredentials },
    });
    children.push(vmm);
    const opened = await new Promise<{ containerId: number; capability: string }>((resolve, reject) => {
      vmm.stdout!.on("data", (d) => {
        const line = String(d)
          .split("\n")
          .find((l) => l.startsWith("{"));
        if (line !== undefined) resolve(JSON.parse(line) as { containerId: number; capability: string });
      });
      vmm.on("exit", (code) => reject(new Error(`VMM exited ${code}`)));
    });
    // The test acts for that VMM, with the capability it printed.
    c.vfio.remember(opened.containerId, decodeVfioCapability(opened.capability)!);
    await c.vfio.assignDevice(P(vfio.AssignDeviceRequest, { containerId: opened.containerId, device: { ref: { $case: "deviceId", value: "pf-k" } } }));
    const p = await c.vfio.allocPasid({ containerId: opened.containerId });
    await c.vfio.bindGuestPasid(
      P(vfio.BindGuestPasidRequest, {
        containerId: opened.containerId,
        device: { ref: { $case: "deviceId", value: "pf-k" } },
        hpasid: p.hpasid,
        generation: p.generation,
        gpasid: 9,
        guestPgtable: 0x5000n,
      }),
    );
    const w = await watchFaults(c, opened.containerId);
    const ids: bigint[] = [];
    for (let i = 0n; i < 3n; i++) ids.push((await dma(c, "pf-k", p.hpasid, GVA_BASE + i * PAGE)).faultGroupId);
    ids.push((await dma(c, "pf-k", p.hpasid, GVA_BASE + 9n * PAGE, { prgi: 100, last: false })).faultGroupId);
    await waitFor(() => w.groups().length === 3);
    vmm.kill("SIGKILL");
    for (const id of ids) expect((await awaitResponse("pf-k", id)).code).toBe(CODE.PAGE_RESPONSE_CODE_INVALID);
    await waitFor(() => isReclaimed(c, p.hpasid), { timeoutMs: 10_000, message: "the crashed guest's IOASID reclaimed" });
    expect((await c.iommu.queryState(P(iommu.QueryStateRequest, { deviceIds: ["pf-k"] }))).faultGroups).toEqual([]);
    expect(await w.ended).toBeUndefined();
  });

  it("drains a freed PASID's pending and partial groups before its reclaim; its next owner sees none of them", async () => {
    const c = stack.clients;
    const since = Date.now() - 1;
    await registerDevice(c, "pf-d");
    const g = await openGuest(c, nextToken(), "pf-d");
    const w = await watchFaults(c, g.containerId);
    const pending = await dma(c, "pf-d", g.hpasid, GVA_BASE + 0x1000n);
    const partial = await dma(c, "pf-d", g.hpasid, GVA_BASE + 0x2000n, { prgi: 5, last: false });
    await waitFor(() => w.groups().length === 1);
    // The guest frees before unbinding (the misbehaving-guest path).
    await c.vfio.freePasid({ containerId: g.containerId, hpasid: g.hpasid, generation: g.generation });
    for (const id of [pending.faultGroupId, partial.faultGroupId]) {
      expect(await awaitResponse("pf-d", id)).toEqual({ code: CODE.PAGE_RESPONSE_CODE_INVALID, source: SOURCE.PAGE_RESPONSE_SOURCE_IOASID_FREED });
    }
    // Drained before the reclaim: both responses precede the RECLAIM in the history.
    let hist: HistoryRecord[] = [];
    await waitFor(
      async () => {
        hist = await readHistory(nc, { sinceMs: since });
        return hist.some((r) => eventOf(r) === "RECLAIM" && r.ioasid === g.hpasid);
      },
      { timeoutMs: 10_000, message: "the RECLAIM" },
    );
    const reclaim = hist.find((r) => eventOf(r) === "RECLAIM" && r.ioasid === g.hpasid)!;
    const drained = hist.filter(
      (r) => r.role === "iommu" && r.action?.$case === "pageResponse" && r.ioasid === g.hpasid && r.action.value.source === "IOASID_FREED",
    );
    expect(drained).toHaveLength(2);
    for (const d of drained) expect(d.ts).toBeLessThanOrEqual(reclaim.ts);

    // The next owner of the same PASID: a new guest allocates until it gets it.
    await registerDevice(c, "pf-d2");
    const next = await openGuest(c, nextToken(), "pf-d2", 300);
    let mine = next.hpasid === g.hpasid ? { hpasid: next.hpasid, generation: next.generation } : undefined;
    for (let i = 0; i < 20 && mine === undefined; i++) {
      const a = await c.vfio.allocPasid({ containerId: next.containerId });
      if (a.hpasid === g.hpasid) mine = a;
    }
    expect(mine, "the PASID was handed to the next owner").toBeDefined();
    if (mine!.hpasid !== next.hpasid) {
      await c.vfio.bindGuestPasid(
        P(vfio.BindGuestPasidRequest, {
          containerId: next.containerId,
          device: { ref: { $case: "deviceId", value: "pf-d2" } },
          hpasid: mine!.hpasid,
          generation: mine!.generation,
          gpasid: 301,
          guestPgtable: 0x5000n,
        }),
      );
    }
    const w2 = await watchFaults(c, next.containerId);
    await new Promise((r) => setTimeout(r, 200));
    expect(w2.groups(), "the old owner's groups never reach the new owner").toEqual([]);
    const left = (await c.iommu.queryState(P(iommu.QueryStateRequest, {}))).faultGroups.filter((f) => f.pasid === g.hpasid);
    expect(left).toEqual([]);
    // The new owner's own page request reaches the new owner only.
    const fresh = await dma(c, "pf-d2", g.hpasid, GVA_BASE + 0x9000n);
    await waitFor(() => w2.groups().length === 1, { message: "the new owner's group" });
    expect(w2.groups()[0]!.faultGroupId).toBe(fresh.faultGroupId);
    expect(w.groups().map((x) => x.faultGroupId)).not.toContain(fresh.faultGroupId);
    w.stop();
    w2.stop();
    g.session.abort();
    next.session.abort();
  });
});

describe("unrecoverable faults", () => {
  it("reports a device without PRI's miss and a permission violation to the VMM, and nothing between free and unbind", async () => {
    const c = stack.clients;
    await registerDevice(c, "np-g", { priCapable: false });
    const token = nextToken();
    // A VM at KVM registers its CPU-priority notifier on the guest's set: the FREE reaches KVM first.
    await c.kvm.createVm(P(kvm.CreateVmRequest, { mmToken: token, vcpuCount: 1, vmName: "faulty" }));
    const g = await openGuest(c, token, "np-g");
    const w = await watchFaults(c, g.containerId);
    const gva = GVA_BASE + 0x50_0000n;
    expect(await dma(c, "np-g", g.hpasid, gva)).toMatchObject({
      outcome: OUTCOME.TRANSLATE_OUTCOME_FAULT,
      faultReason: iommu.FaultReason.FAULT_REASON_NOT_PRESENT,
    });
    await c.vfio.mapGuestPages(
      P(vfio.MapGuestPagesRequest, { containerId: g.containerId, hpasid: g.hpasid, iova: gva, gpa: 0x1000_5000n, size: PAGE, access: { read: true } }),
    );
    expect(await dma(c, "np-g", g.hpasid, gva, { write: true })).toMatchObject({
      outcome: OUTCOME.TRANSLATE_OUTCOME_FAULT,
      faultReason: iommu.FaultReason.FAULT_REASON_PERMISSION,
    });
    await waitFor(() => w.faults().length === 2, { message: "two fault records at the VMM" });
    expect(w.faults().map((f) => [f.reason, f.hpasid, f.gpasid, f.address])).toEqual([
      ["FAULT_REASON_NOT_PRESENT", g.hpasid, g.gpasid, gva],
      ["FAULT_REASON_PERMISSION", g.hpasid, g.gpasid, gva],
    ]);

    // Hold KVM (SIGSTOP): the FREE waits at the CPU tier, the IOMMU entry is still programmed, and
    // the IOASID is FREE_PENDING — the window between free and unbind.
    await stopProcess(stack.procs.kvm.pid, "kvm");
    try {
      await c.vfio.freePasid({ containerId: g.containerId, hpasid: g.hpasid, generation: g.generation });
      expect((await c.core.describe({ ioasid: g.hpasid })).info!.state).toBe(core.IoasidState.IOASID_STATE_FREE_PENDING);
      expect(await dma(c, "np-g", g.hpasid, gva, { write: true })).toMatchObject({
        outcome: OUTCOME.TRANSLATE_OUTCOME_FAULT,
        faultReason: iommu.FaultReason.FAULT_REASON_PERMISSION,
      });
      await new Promise((r) => setTimeout(r, 300));
    } finally {
      await continueProcess(stack.procs.kvm.pid, "kvm");
    }
    expect(w.faults(), "no fault reported between free and unbind").toHaveLength(2);
    await waitFor(
      async () => (await c.iommu.queryState(P(iommu.QueryStateRequest, { deviceIds: ["np-g"] }))).devices[0]!.pasidEntries.every((e) => e.pasid !== g.hpasid),
      {
        timeoutMs: 10_000,
        message: "the FREE teardown at the IOMMU",
      },
    );
    // After the teardown there is no entry and no handle: nothing to report to anyone.
    expect(await dma(c, "np-g", g.hpasid, gva)).toMatchObject({ faultReason: iommu.FaultReason.FAULT_REASON_NO_PASID_ENTRY, handleId: 0n });
    await new Promise((r) => setTimeout(r, 200));
    expect(w.faults()).toHaveLength(2);
    w.stop();
    g.session.abort();
  });
});

import { Code } from "@ioasid/errors";
import { TokenType } from "@ioasid/ioasid";
import { describe, expect, it } from "vitest";
import { CloseReason, ContainerState } from "./container.js";
import { closeOf, dev, err, ioasidsOf, open, refused, setIds, setup, snapshot } from "./vfio-containers.fixture.js";

describe("VfioContainers › opening", () => {
  it("creates the VM's set with its MM token and quota, and records container_open", async () => {
    const { core, vfio, history, scheduler } = setup();
    const c = await open(vfio, 7n, { quota: 4 });
    expect(core.space.getSet(c.setId)).toMatchObject({ token: { type: TokenType.MM, value: 7n }, quota: 4 });
    expect(c).toMatchObject({ containerId: 1, quota: 4, sessionDeadline: scheduler.now() + 5000 });
    expect(history[0]).toMatchObject({ action: "containerOpen", fields: { setId: c.setId } });
    const [snap] = await vfio.queryState(c.containerId);
    expect(snap).toMatchObject({ state: ContainerState.AWAITING_SESSION, mmToken: 7n, vmName: "vm-7", devices: [], pasids: [] });
  });

  it("refuses bad input with INVALID_FIELD and creates no set", async () => {
    const { core, vfio } = setup();
    const e = await refused(open(vfio, 0n), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    expect(e.metadata["field"]).toBe("mm_token");
    await refused(open(vfio, 1n, { sessionGraceMs: 86_400_001 }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(vfio.openContainer({ mmToken: 1n, quota: 0, vmName: "x".repeat(300), sessionGraceMs: 0 }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    expect(setIds(core)).toEqual([]);
    expect(vfio.size).toBe(0);
  });

  it("refuses a second container for the same VM (TOKEN_IN_USE) and leaves the first alone", async () => {
    const { core, vfio } = setup();
    const a = await open(vfio, 7n);
    const before = snapshot(core);
    await refused(open(vfio, 7n), Code.ALREADY_EXISTS, "TOKEN_IN_USE");
    expect(snapshot(core)).toBe(before);
    expect((await vfio.queryState(0)).map((s) => s.containerId)).toEqual([a.containerId]);
  });

  it("refuses container id 0 as INVALID_FIELD and an unknown one as CONTAINER_NOT_FOUND", async () => {
    const { vfio } = setup();
    await refused(vfio.allocPasid(0), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(vfio.allocPasid(42), Code.NOT_FOUND, "CONTAINER_NOT_FOUND");
    await refused(vfio.queryState(42), Code.NOT_FOUND, "CONTAINER_NOT_FOUND");
    await refused(() => vfio.attachSession(42), Code.NOT_FOUND, "CONTAINER_NOT_FOUND");
    await refused(vfio.closeContainer(42), Code.NOT_FOUND, "CONTAINER_NOT_FOUND");
  });
});

describe("VfioContainers › the VMM session", () => {
  it("turns the container ACTIVE, stops the grace timer, and refuses a second session", async () => {
    const { vfio, scheduler } = setup();
    const c = await open(vfio, 7n);
    const lease = vfio.attachSession(c.containerId);
    expect(lease).toMatchObject({ containerId: c.containerId, setId: c.setId });
    const [snap] = await vfio.queryState(c.containerId);
    expect(snap).toMatchObject({ state: ContainerState.ACTIVE, sessionDeadline: undefined });
    await refused(() => vfio.attachSession(c.containerId), Code.ALREADY_EXISTS, "SESSION_ALREADY_ATTACHED");
    await scheduler.advance(60_000);
    expect(vfio.size).toBe(1); // the grace period no longer applies
  });

  it("frees every IOASID of the set when the session ends from the VMM's side (crash)", async () => {
    const { core, vfio, history } = setup();
    const c = await open(vfio, 7n);
    const lease = vfio.attachSession(c.containerId);
    await vfio.allocPasid(c.containerId);
    await vfio.allocPasid(c.containerId);
    lease.end();
    await expect(lease.closed).resolves.toBe(CloseReason.SESSION_ENDED);
    await vfio.whenReleased(c.containerId);
    expect(core.calls).toContain("freeSet");
    expect(setIds(core)).not.toContain(c.setId); // nothing held them: reclaimed, set destroyed
    expect(ioasidsOf(core)).toHaveLength(0);
    expect(vfio.size).toBe(0);
    expect(closeOf(history)).toMatchObject({ reason: "SESSION_ENDED", freed: 2 });
    await refused(vfio.allocPasid(c.containerId), Code.NOT_FOUND, "CONTAINER_NOT_FOUND");
  });

  it("keeps closing a crashed guest's container in the background while the core stays unreachable past the FreeSet retries", async () => {
    const { core, vfio, scheduler, history } = setup({ freeSetRetryDelaysMs: [10, 20] });
    const c = await open(vfio, 7n);
    const lease = vfio.attachSession(c.containerId);
    await vfio.allocPasid(c.containerId);
    // Three rounds of (3 attempts) fail: nobody calls CloseContainer for a crashed VMM.
    for (let i = 0; i < 9; i++) core.failNext("freeSet", err(Code.UNAVAILABLE, "UNAVAILABLE"));
    lease.end();
    await scheduler.advance(30 + 500 + 30 + 1000 + 30 + 1999);
    expect(ioasidsOf(core)).toHaveLength(1);
    expect(core.calls.filter((m) => m === "freeSet")).toHaveLength(9);
    await scheduler.advance(1);
    await expect(lease.closed).resolves.toBe(CloseReason.SESSION_ENDED);
    await vfio.whenReleased(c.containerId);
    expect(core.calls.filter((m) => m === "freeSet")).toHaveLength(10);
    expect(ioasidsOf(core)).toHaveLength(0);
    expect(vfio.size).toBe(0);
    expect(closeOf(history)).toMatchObject({ reason: "SESSION_ENDED", freed: 1 });
  });

  it("takes over, when the session ends, a CloseContainer that is still in progress and then fails", async () => {
    const { core, vfio, scheduler } = setup({ freeSetRetryDelaysMs: [10] });
    const c = await open(vfio, 7n);
    const lease = vfio.attachSession(c.containerId);
    await vfio.allocPasid(c.containerId);
    core.failNext("freeSet", err(Code.UNAVAILABLE, "UNAVAILABLE"));
    core.failNext("freeSet", err(Code.UNAVAILABLE, "UNAVAILABLE"));
    const close = refused(vfio.closeContainer(c.containerId), Code.UNAVAILABLE, "UNAVAILABLE");
    lease.end(); // the VMM is killed while its close waits for the core
    await scheduler.advance(10);
    await close;
    expect(ioasidsOf(core)).toHaveLength(1);
    await scheduler.advance(500); // the background close's next round
    await vfio.whenReleased(c.containerId);
    expect(ioasidsOf(core)).toHaveLength(0);
    expect(vfio.size).toBe(0);
  });

  it("stops retrying a background close once VFIO stops; closeAll closes the container", async () => {
    const { core, vfio, scheduler } = setup({ freeSetRetryDelaysMs: [] });
    const c = await open(vfio, 7n);
    const lease = vfio.attachSession(c.containerId);
    await vfio.allocPasid(c.containerId);
    core.failNext("freeSet", err(Code.UNAVAILABLE, "UNAVAILABLE"));
    lease.end();
    await scheduler.advance(0);
    expect(core.calls.filter((m) => m === "freeSet")).toHaveLength(1);
    await vfio.closeAll();
    await expect(lease.closed).resolves.toBe(CloseReason.SERVICE_STOPPED);
    await scheduler.advance(10_000);
    expect(core.calls.filter((m) => m === "freeSet")).toHaveLength(2);
    expect(vfio.size).toBe(0);
  });

  it("closes a container whose session never attaches within the grace period, and only then", async () => {
    const { core, vfio, scheduler, history } = setup();
    const c = await open(vfio, 7n, { sessionGraceMs: 1000 });
    await vfio.allocPasid(c.containerId); // a VMM may set up before it attaches
    await scheduler.advance(999);
    expect(vfio.size).toBe(1);
    await scheduler.advance(1);
    await vfio.whenReleased(c.containerId);
    expect(vfio.size).toBe(0);
    expect(setIds(core)).toEqual([]);
    expect(closeOf(history)).toMatchObject({ reason: "SESSION_NEVER_ATTACHED" });
  });

  it("uses the service default grace period when OpenContainer gives none", async () => {
    const { vfio, scheduler } = setup();
    await open(vfio, 7n);
    await scheduler.advance(4999);
    expect(vfio.size).toBe(1);
    await scheduler.advance(1);
    expect(vfio.size).toBe(0);
  });
});

describe("VfioContainers › CloseContainer", () => {
  it("frees the set, ends the session with CLOSED, and forgets the container", async () => {
    const { core, vfio } = setup();
    const c = await open(vfio, 7n);
    const lease = vfio.attachSession(c.containerId);
    await vfio.allocPasid(c.containerId);
    await expect(vfio.closeContainer(c.containerId)).resolves.toEqual({ freed: 1, unassignedDevices: 0 });
    await expect(lease.closed).resolves.toBe(CloseReason.CLOSED);
    lease.end(); // the stream then ends: no second close
    await vfio.whenReleased(c.containerId);
    expect(core.calls.filter((m) => m === "freeSet")).toHaveLength(1);
    await refused(vfio.closeContainer(c.containerId), Code.NOT_FOUND, "CONTAINER_NOT_FOUND");
  });

  it("refuses every call on a closing container with CONTAINER_CLOSING; a second close joins the first", async () => {
    const { core, vfio, scheduler } = setup({ freeSetRetryDelaysMs: [1000] });
    const c = await open(vfio, 7n);
    core.failNext("freeSet", err(Code.UNAVAILABLE, "UNAVAILABLE"));
    const first = vfio.closeContainer(c.containerId);
    const second = vfio.closeContainer(c.containerId);
    await refused(vfio.allocPasid(c.containerId), Code.FAILED_PRECONDITION, "CONTAINER_CLOSING");
    await refused(vfio.assignDevice(c.containerId, dev("0000:6a:01.0")), Code.FAILED_PRECONDITION, "CONTAINER_CLOSING");
    await refused(() => vfio.attachSession(c.containerId), Code.FAILED_PRECONDITION, "CONTAINER_CLOSING");
    expect((await vfio.queryState(c.containerId))[0]!.state).toBe(ContainerState.CLOSING);
    await scheduler.advance(1000);
    expect(await first).toEqual(await second);
    expect(core.calls.filter((m) => m === "freeSet")).toHaveLength(2); // one failure, one retry
  });

  it("keeps retrying FreeSet while the core is unreachable, and a later close retries after giving up", async () => {
    const { core, vfio, scheduler } = setup({ freeSetRetryDelaysMs: [10, 20] });
    const c = await open(vfio, 7n);
    await vfio.allocPasid(c.containerId);
    core.failNext("freeSet", err(Code.UNAVAILABLE, "UNAVAILABLE"));
    core.failNext("freeSet", err(Code.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"));
    core.failNext("freeSet", err(Code.UNAVAILABLE, "UNAVAILABLE"));
    const first = vfio.closeContainer(c.containerId);
    const failed = refused(first, Code.UNAVAILABLE, "UNAVAILABLE");
    await scheduler.advance(30);
    await failed;
    expect(ioasidsOf(core)).toHaveLength(1);
    expect((await vfio.queryState(c.containerId))[0]!.state).toBe(ContainerState.CLOSING); // nothing new may start
    await expect(vfio.closeContainer(c.containerId)).resolves.toMatchObject({ freed: 1 });
    expect(ioasidsOf(core)).toHaveLength(0);
  });

  it("closeAll closes every container with SERVICE_STOPPED", async () => {
    const { core, vfio } = setup();
    const a = await open(vfio, 7n);
    await open(vfio, 8n);
    const lease = vfio.attachSession(a.containerId);
    await vfio.closeAll();
    await expect(lease.closed).resolves.toBe(CloseReason.SERVICE_STOPPED);
    expect(vfio.size).toBe(0);
    expect(setIds(core)).toEqual([]);
  });
});

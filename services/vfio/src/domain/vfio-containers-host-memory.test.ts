import { Code } from "@ioasid/errors";
import { describe, expect, it } from "vitest";
import { CloseReason } from "./container.js";
import type { HostRange } from "./host-memory-pool.js";
import { dev, err, MapStore, open, optionsOf, refused, setIds, setup, snapshot } from "./vfio-containers.fixture.js";
import { DEFAULT_GUEST_MEMORY_SIZE, DEFAULT_HOST_MEMORY, VfioContainers } from "./vfio-containers.js";

// Issue 14 item 3: "MapDma accepts only host-physical ranges the VM was given". Each container is
// given host memory at open, exclusively; MapDma maps only inside it; the memory goes back to the
// pool when the container is released, however it closes.

const access = { read: true, write: true, execute: false, privileged: false };
const MiB = 1n << 20n;
const PAGE = 0x1000n;
/** A pool of 4 MiB from 4 GiB: room for four containers of 1 MiB. */
const SMALL = { hostMemory: { base: 1n << 32n, size: 4n * MiB }, guestMemorySize: MiB } as const;

const overlaps = (a: HostRange, b: HostRange): boolean => a.paddr < b.paddr + b.size && b.paddr < a.paddr + a.size;
const total = (rs: readonly HostRange[]): bigint => rs.reduce((s, r) => s + r.size, 0n);

describe("VfioContainers › host memory given at open", () => {
  it("gives each container the memory it asks for (else the default), inside the pool, never overlapping another live container's", async () => {
    const { vfio } = setup(SMALL);
    const a = await open(vfio, 7n);
    const b = await open(vfio, 8n, { guestMemorySize: 2n * MiB });
    const c = await open(vfio, 9n, { guestMemorySize: 4n * PAGE });
    expect(total(a.guestMemory)).toBe(MiB);
    expect(total(b.guestMemory)).toBe(2n * MiB);
    expect(total(c.guestMemory)).toBe(4n * PAGE);
    const all = [a, b, c].flatMap((o) => o.guestMemory.map((r) => ({ r, owner: o.containerId })));
    for (const x of all) {
      expect(x.r.paddr >= SMALL.hostMemory.base && x.r.paddr + x.r.size <= SMALL.hostMemory.base + SMALL.hostMemory.size).toBe(true);
      for (const y of all) if (x !== y) expect(overlaps(x.r, y.r), `containers ${x.owner} and ${y.owner}`).toBe(false);
    }
    // QueryState shows it (the operator's view; host addresses are not secret).
    const snaps = await vfio.queryState(0);
    expect(snaps.map((s) => s.guestMemory)).toEqual([a.guestMemory, b.guestMemory, c.guestMemory]);
    expect(vfio.hostMemory.freeBytes).toBe(4n * MiB - 3n * MiB - 4n * PAGE);
  });

  it("defaults to 1 GiB from a 64 GiB pool at 4 GiB", async () => {
    const { vfio } = setup();
    const a = await open(vfio, 7n);
    expect(a.guestMemory).toEqual([{ paddr: DEFAULT_HOST_MEMORY.base, size: DEFAULT_GUEST_MEMORY_SIZE }]);
    expect(vfio.hostMemory).toMatchObject({ base: 1n << 32n, size: 64n << 30n });
  });

  it("records the memory given in container_open", async () => {
    const { vfio, history } = setup(SMALL);
    const a = await open(vfio, 7n);
    expect(history[0]?.step).toMatchObject({ $case: "containerOpen", value: { guestMemory: a.guestMemory } });
  });

  it("refuses a size that is not a multiple of 4 KiB or larger than the pool (INVALID_FIELD guest_memory_size), creating nothing", async () => {
    const { core, vfio, history } = setup(SMALL);
    for (const size of [1n, PAGE + 1n, 5n * MiB]) {
      const e = await refused(open(vfio, 7n, { guestMemorySize: size }), Code.INVALID_ARGUMENT, "INVALID_FIELD");
      expect(e.metadata["field"]).toBe("guest_memory_size");
    }
    expect(setIds(core)).toEqual([]);
    expect(vfio.size).toBe(0);
    expect(history).toEqual([]);
    expect(vfio.hostMemory.freeBytes).toBe(4n * MiB);
  });

  it("refuses an open the pool cannot serve with RESOURCE_EXHAUSTED HOST_MEMORY_EXHAUSTED, creating no set and taking nothing", async () => {
    const { core, vfio, history } = setup(SMALL);
    await open(vfio, 7n, { guestMemorySize: 3n * MiB });
    const before = { core: snapshot(core), free: vfio.hostMemory.freeRanges, history: history.length, containers: vfio.size };
    await refused(open(vfio, 8n, { guestMemorySize: 2n * MiB }), Code.RESOURCE_EXHAUSTED, "HOST_MEMORY_EXHAUSTED");
    expect({ core: snapshot(core), free: vfio.hostMemory.freeRanges, history: history.length, containers: vfio.size }).toEqual(before);
    // What is left is still given.
    expect(total((await open(vfio, 8n)).guestMemory)).toBe(MiB);
  });

  it("puts the memory back when the core refuses the set (TOKEN_IN_USE, the core down)", async () => {
    const { core, vfio } = setup(SMALL);
    await open(vfio, 7n);
    const free = vfio.hostMemory.freeBytes;
    await refused(open(vfio, 7n), Code.ALREADY_EXISTS, "TOKEN_IN_USE");
    core.failNext("createSet", err(Code.UNAVAILABLE, "UNAVAILABLE"));
    await refused(open(vfio, 8n), Code.UNAVAILABLE, "UNAVAILABLE");
    expect(vfio.hostMemory.freeBytes).toBe(free);
  });

  it("gives two opens racing each other different memory", async () => {
    const { vfio } = setup(SMALL);
    const opened = await Promise.all([7n, 8n, 9n, 10n].map((t) => open(vfio, t)));
    const ranges = opened.flatMap((o) => o.guestMemory);
    for (const x of ranges) for (const y of ranges) if (x !== y) expect(overlaps(x, y)).toBe(false);
    await refused(open(vfio, 11n), Code.RESOURCE_EXHAUSTED, "HOST_MEMORY_EXHAUSTED");
  });
});

describe("VfioContainers › MapDma maps only memory the VM was given", () => {
  it("maps inside the container's memory, up to its last page", async () => {
    const { vfio, iommu } = setup(SMALL);
    const a = await open(vfio, 7n);
    const [r] = a.guestMemory;
    await vfio.mapDma(a.containerId, { iova: 0n, paddr: r!.paddr, size: r!.size, access });
    await vfio.mapDma(a.containerId, { iova: r!.size, paddr: r!.paddr + r!.size - PAGE, size: PAGE, access });
    expect(iommu.mapped).toHaveLength(2);
  });

  it("refuses memory outside it, straddling its end, or another VM's with PERMISSION_DENIED HOST_MEMORY_NOT_GIVEN, creating nothing", async () => {
    const { core, vfio, iommu, history } = setup(SMALL);
    const a = await open(vfio, 7n);
    const b = await open(vfio, 8n);
    const ra = a.guestMemory[0]!;
    const rb = b.guestMemory[0]!;
    const before = { core: snapshot(core), iommu: [...iommu.log], history: history.length };
    const attempts: Array<[string, bigint, bigint]> = [
      ["VM A's memory, by VM B's VMM", ra.paddr, PAGE],
      ["all of VM A's memory", ra.paddr, ra.size],
      ["below the pool", 0n, PAGE],
      ["the pool's free memory, given to nobody", SMALL.hostMemory.base + 3n * MiB, PAGE],
      ["past the end of B's memory", rb.paddr + rb.size, PAGE],
      ["straddling the end of B's memory", rb.paddr + rb.size - PAGE, 2n * PAGE],
      ["straddling its start", rb.paddr - PAGE, 2n * PAGE],
    ];
    for (const [what, paddr, size] of attempts) {
      const e = await refused(vfio.mapDma(b.containerId, { iova: 0n, paddr, size, access }), Code.PERMISSION_DENIED, "HOST_MEMORY_NOT_GIVEN");
      expect(e.message, what).toContain(`container ${b.containerId}`);
    }
    // Nothing created: no stage-2 domain for B (a refused MapDma creates nothing), no mapping, no history.
    expect({ core: snapshot(core), iommu: iommu.log, history: history.length }).toEqual(before);
    expect(iommu.domains.size).toBe(0);
    // B's own memory still maps.
    await vfio.mapDma(b.containerId, { iova: 0n, paddr: rb.paddr, size: PAGE, access });
    expect(iommu.mapped).toEqual([{ domainId: 100, iova: 0n, size: PAGE }]);
  });

  it("checks the memory after the shape (a misaligned address is still ADDRESS_NOT_ALIGNED)", async () => {
    const { vfio } = setup(SMALL);
    const a = await open(vfio, 7n);
    await refused(vfio.mapDma(a.containerId, { iova: 0n, paddr: 1n, size: PAGE, access }), Code.INVALID_ARGUMENT, "ADDRESS_NOT_ALIGNED");
  });

  it("refuses memory a closed container had, once another container was given it", async () => {
    const { vfio, iommu } = setup({ ...SMALL, hostMemory: { base: 1n << 32n, size: MiB } });
    const a = await open(vfio, 7n);
    const ra = a.guestMemory[0]!;
    await vfio.closeContainer(a.containerId);
    await vfio.whenReleased(a.containerId);
    const b = await open(vfio, 8n);
    expect(b.guestMemory).toEqual([ra]);
    await refused(vfio.mapDma(a.containerId, { iova: 0n, paddr: ra.paddr, size: PAGE, access }), Code.NOT_FOUND, "CONTAINER_NOT_FOUND");
    await vfio.mapDma(b.containerId, { iova: 0n, paddr: ra.paddr, size: PAGE, access });
    expect(iommu.mapped).toHaveLength(1);
  });
});

describe("VfioContainers › host memory goes back to the pool when the container is released", () => {
  /** A pool with room for one container: the next open succeeds only once the first gave its memory back. */
  const ONE = { hostMemory: { base: 1n << 32n, size: MiB }, guestMemorySize: MiB } as const;

  it("on CloseContainer, once the stage-2 domain is freed (a new container is then given the same memory)", async () => {
    const { vfio, iommu } = setup(ONE);
    const a = await open(vfio, 7n);
    await vfio.assignDevice(a.containerId, dev("0000:6a:01.0"));
    await vfio.mapDma(a.containerId, { iova: 0n, paddr: a.guestMemory[0]!.paddr, size: MiB, access });
    await refused(open(vfio, 8n), Code.RESOURCE_EXHAUSTED, "HOST_MEMORY_EXHAUSTED");
    await vfio.closeContainer(a.containerId, CloseReason.CLOSED);
    await vfio.whenReleased(a.containerId);
    expect(iommu.log.at(-1)).toBe("freeDomain 100");
    const b = await open(vfio, 8n);
    expect(b.guestMemory).toEqual(a.guestMemory);
  });

  it("when the session ends (the VMM crashed) and when no session attaches in time", async () => {
    const { vfio, scheduler } = setup(ONE);
    const a = await open(vfio, 7n);
    vfio.attachSession(a.containerId).end();
    await vfio.whenReleased(a.containerId);
    expect(vfio.hostMemory.freeBytes).toBe(MiB);
    const b = await open(vfio, 8n, { sessionGraceMs: 1000 });
    await scheduler.advance(1000);
    await vfio.whenReleased(b.containerId);
    expect(vfio.hostMemory.freeBytes).toBe(MiB);
    await open(vfio, 9n);
  });

  it("when VFIO stops (closeAll)", async () => {
    const { vfio } = setup(ONE);
    await open(vfio, 7n);
    await vfio.closeAll();
    expect(vfio.hostMemory.freeBytes).toBe(MiB);
  });

  it("withholds the memory while the stage-2 domain could not be freed (a device might still reach it)", async () => {
    const { vfio, iommu } = setup({ ...ONE, domainReleaseRetryDelaysMs: [] });
    const a = await open(vfio, 7n);
    await vfio.mapDma(a.containerId, { iova: 0n, paddr: a.guestMemory[0]!.paddr, size: PAGE, access });
    iommu.failures.set("freeDomain", [err(Code.FAILED_PRECONDITION, "DOMAIN_IN_USE")]);
    await vfio.closeContainer(a.containerId);
    await vfio.whenReleased(a.containerId);
    expect(vfio.size).toBe(0);
    expect(vfio.hostMemory.freeBytes).toBe(0n);
    await refused(open(vfio, 8n), Code.RESOURCE_EXHAUSTED, "HOST_MEMORY_EXHAUSTED");
  });
});

describe("VfioContainers › host memory across a VFIO restart (kill -9)", () => {
  it("keeps each container's memory in its role state, gives it to nobody else while the restored container lives, and takes it back when it is closed", async () => {
    const store = new MapStore();
    const first = setup({ ...SMALL, store });
    const a = await open(first.vfio, 7n, { guestMemorySize: 2n * MiB });
    await first.vfio.mapDma(a.containerId, { iova: 0n, paddr: a.guestMemory[0]!.paddr, size: PAGE, access });
    const kept = store.saved.get(`ctr/${a.containerId}`);
    expect(kept?.kind === "container" ? kept.guestMemory : undefined).toEqual(a.guestMemory);

    // A VFIO back from kill -9, rebuilt from what was kept: A's memory is still A's.
    const restarted = new VfioContainers({ ...optionsOf(first), ...SMALL, store, saved: new Map(store.saved) });
    expect(restarted.hostMemory.freeBytes).toBe(2n * MiB);
    const [snap] = await restarted.queryState(a.containerId);
    expect(snap?.guestMemory).toEqual(a.guestMemory);
    // A container opened before the restored one is closed is given other memory, and cannot map A's.
    const b = await open(restarted, 8n, { guestMemorySize: 2n * MiB });
    for (const x of b.guestMemory) for (const y of a.guestMemory) expect(overlaps(x, y)).toBe(false);
    await refused(
      restarted.mapDma(b.containerId, { iova: 0n, paddr: a.guestMemory[0]!.paddr, size: PAGE, access }),
      Code.PERMISSION_DENIED,
      "HOST_MEMORY_NOT_GIVEN",
    );
    await refused(open(restarted, 9n), Code.RESOURCE_EXHAUSTED, "HOST_MEMORY_EXHAUSTED");

    // Reclaim after the restart closes A as a crashed guest and gives its memory back.
    expect(await restarted.closeRestored()).toBe(1);
    expect(restarted.hostMemory.freeRanges).toEqual(a.guestMemory);
    expect(store.saved.has(`ctr/${a.containerId}`)).toBe(false);
    const c = await open(restarted, 9n, { guestMemorySize: 2n * MiB });
    expect(c.guestMemory).toEqual(a.guestMemory);
  });

  it("takes back only what is inside the pool when it was made smaller across the restart", async () => {
    const store = new MapStore();
    const first = setup({ ...SMALL, store });
    await open(first.vfio, 7n, { guestMemorySize: 3n * MiB });
    const smaller = { hostMemory: { base: 1n << 32n, size: 2n * MiB }, guestMemorySize: MiB };
    const restarted = new VfioContainers({ ...optionsOf(first), ...smaller, store, saved: new Map(store.saved) });
    const [snap] = await restarted.queryState(0);
    expect(snap?.guestMemory).toEqual([{ paddr: 1n << 32n, size: 2n * MiB }]);
    expect(restarted.hostMemory.freeBytes).toBe(0n);
    await restarted.closeRestored();
    expect(restarted.hostMemory.freeRanges).toEqual([{ paddr: 1n << 32n, size: 2n * MiB }]);
  });
});

import { Code } from "@ioasid/errors";
import { describe, expect, it } from "vitest";
import { capabilityDigest, CAPABILITY_BYTES } from "./container-capability.js";
import { ContainerState } from "./container.js";
import { MapStore, open, optionsOf, refused, setup, snapshot } from "./vfio-containers.fixture.js";
import { VfioContainers } from "./vfio-containers.js";
import type { VfioKeptEntry } from "./vfio-kept-entry.js";

describe("VfioContainers › capabilities (DESIGN §3: authority is a capability, not a name)", () => {
  it("answers each container a distinct 32-byte capability and accepts only that one for it", async () => {
    const { vfio } = setup();
    const a = await open(vfio, 7n);
    const b = await open(vfio, 8n);
    expect(a.capability).toHaveLength(CAPABILITY_BYTES);
    expect(Buffer.from(a.capability).equals(Buffer.from(b.capability))).toBe(false);
    expect(() => vfio.authorize(a.containerId, a.capability)).not.toThrow();
    expect(() => vfio.authorize(b.containerId, b.capability)).not.toThrow();
  });

  it("refuses a call without a capability (CAPABILITY_MISSING) and with another container's or a malformed one (CAPABILITY_NOT_FOR_CONTAINER)", async () => {
    const { core, vfio } = setup();
    const a = await open(vfio, 7n);
    const b = await open(vfio, 8n);
    const before = snapshot(core);
    await refused(() => vfio.authorize(a.containerId, undefined), Code.PERMISSION_DENIED, "CAPABILITY_MISSING");
    await refused(() => vfio.authorize(a.containerId, b.capability), Code.PERMISSION_DENIED, "CAPABILITY_NOT_FOR_CONTAINER");
    await refused(() => vfio.authorize(a.containerId, new Uint8Array(0)), Code.PERMISSION_DENIED, "CAPABILITY_NOT_FOR_CONTAINER");
    // One bit off is as wrong as any other value.
    const flipped = Buffer.from(a.capability);
    flipped[0] = flipped[0]! ^ 1;
    await refused(() => vfio.authorize(a.containerId, flipped), Code.PERMISSION_DENIED, "CAPABILITY_NOT_FOR_CONTAINER");
    expect(snapshot(core)).toBe(before);
  });

  it("looks the container up first: container_id 0 is INVALID_FIELD and an unknown id CONTAINER_NOT_FOUND (ids are not secret)", async () => {
    const { vfio } = setup();
    const a = await open(vfio, 7n);
    await refused(() => vfio.authorize(0, a.capability), Code.INVALID_ARGUMENT, "INVALID_FIELD");
    await refused(() => vfio.authorize(42, a.capability), Code.NOT_FOUND, "CONTAINER_NOT_FOUND");
  });

  it("still checks a closing container's capability, and a closed container's capability opens no later container", async () => {
    const { vfio, scheduler } = setup();
    const a = await open(vfio, 7n);
    vfio.attachSession(a.containerId);
    const closing = vfio.closeContainer(a.containerId);
    const [snap] = await vfio.queryState(a.containerId);
    expect(snap?.state).toBe(ContainerState.CLOSING);
    await refused(() => vfio.authorize(a.containerId, undefined), Code.PERMISSION_DENIED, "CAPABILITY_MISSING");
    expect(() => vfio.authorize(a.containerId, a.capability)).not.toThrow();
    await closing;
    await scheduler.advance(60_000);
    await vfio.whenReleased(a.containerId);
    await refused(() => vfio.authorize(a.containerId, a.capability), Code.NOT_FOUND, "CONTAINER_NOT_FOUND");
    const next = await open(vfio, 7n);
    expect(next.containerId).not.toBe(a.containerId);
    await refused(() => vfio.authorize(next.containerId, a.capability), Code.PERMISSION_DENIED, "CAPABILITY_NOT_FOR_CONTAINER");
  });

  it("keeps only the capability's digest, and a VFIO restarted from its kept state still accepts the VMM's capability", async () => {
    const store = new MapStore();
    const first = setup({ store });
    const a = await open(first.vfio, 7n);
    const kept = store.saved.get(`ctr/${a.containerId}`);
    expect(kept?.kind).toBe("container");
    const keptDigest = kept?.kind === "container" ? kept.capabilityDigest : undefined;
    expect(Buffer.from(keptDigest!).equals(Buffer.from(capabilityDigest(a.capability)))).toBe(true);
    // The secret itself is not kept: whoever reads the role state cannot become the VMM.
    expect(
      JSON.stringify(kept, (_k, v: unknown) => (v instanceof Uint8Array ? Buffer.from(v).toString("hex") : typeof v === "bigint" ? String(v) : v)),
    ).not.toContain(Buffer.from(a.capability).toString("hex"));

    // A VFIO back from kill -9 rebuilt from what was kept.
    const restarted = new VfioContainers({ ...optionsOf(first), store, saved: new Map(store.saved) });
    expect(() => restarted.authorize(a.containerId, a.capability)).not.toThrow();
    await refused(() => restarted.authorize(a.containerId, undefined), Code.PERMISSION_DENIED, "CAPABILITY_MISSING");
    const other = await open(setup().vfio, 9n);
    await refused(() => restarted.authorize(a.containerId, other.capability), Code.PERMISSION_DENIED, "CAPABILITY_NOT_FOR_CONTAINER");
  });

  it("accepts no capability for a container kept before capabilities existed (empty digest)", () => {
    const { core, iommu, vdcm, scheduler } = setup();
    const saved = new Map<string, VfioKeptEntry>([
      [
        "ctr/3",
        {
          kind: "container",
          id: 3,
          setId: 1,
          mmToken: 7n,
          vmName: "old",
          quota: 4,
          openedAt: 1,
          devices: [],
          stage2: undefined,
          capabilityDigest: new Uint8Array(0),
          guestMemory: [],
        },
      ],
    ]);
    const vfio = new VfioContainers({ core, iommu, vdcm, scheduler, history: { record: () => {} }, sessionGraceMs: 5000, saved });
    expect(() => vfio.authorize(3, new Uint8Array(CAPABILITY_BYTES))).toThrow(expect.objectContaining({ reason: "CAPABILITY_NOT_FOR_CONTAINER" }) as Error);
  });
});

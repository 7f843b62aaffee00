import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { readHistory } from "@ioasid/bus";
import { isDomainError } from "@ioasid/errors";
import { iommu, vfio } from "@ioasid/proto";
import { waitFor } from "@ioasid/testkit";
import { startStack, type StackFixture } from "../support/stack-fixture.js";
import { GVA_BASE, OUTCOME, PAGE, dma, gpaOf, openGuest, registerDevice, watchFaults, type Guest, type Watch } from "../support/fault-fixture.js";
import { createPrng } from "@ioasid/chaos"; // mulberry32: a seed replays the same steps

// Stress of S7 ("every page-request group gets exactly one response") and L3 ("every page request
// is eventually answered") through the real services: thousands of page requests across several
// devices, single and multi-request groups, guests answering at random (SUCCESS, INVALID, or not
// at all: timeout), random unbinds (handle teardown) and VMM crashes (session loss), with the
// devices' credits small enough to run out. Afterwards every group raised must have exactly one
// page_response in the IOMMU's recorded history, and none may be left outstanding.

const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);
const SEED = Number(process.env["FAULT_STRESS_SEED"] ?? 20261121);
const REQUESTS = Number(process.env["FAULT_STRESS_REQUESTS"] ?? 3000);
const DEVICES = 4;
const FAULT_TIMEOUT_MS = 800;

let stack: StackFixture;
let nc: NatsConnection;
beforeAll(async () => {
  stack = await startStack({ IOMMU_FAULT_TIMEOUT: `${FAULT_TIMEOUT_MS}ms` });
  nc = await connect({ servers: stack.nats.url });
}, 60_000);
afterAll(async () => {
  await nc?.close();
  await stack?.stop();
});

/** Refusals a racing guest, device or chaos step may meet: they are outcomes here, not failures. */
const EXPECTED = [
  "FAULT_GROUP_ALREADY_RESPONDED",
  "FAULT_GROUP_NOT_FOUND",
  "FAULT_GROUP_NOT_GIVEN",
  "IOVA_ALREADY_MAPPED",
  "GUEST_BIND_NOT_FOUND",
  "CONTAINER_CLOSING",
  "CONTAINER_NOT_FOUND",
  "PRGI_IN_USE",
  "IOASID_NOT_IN_SET",
  "STALE_GENERATION",
  "IOASID_FREE_PENDING",
  "IOASID_NOT_FOUND",
  "CANCELLED",
];
const tolerate = (err: unknown) => {
  if (!EXPECTED.some((r) => isDomainError(err, r))) throw err;
};

describe("fault stress", () => {
  it(`gives every one of ${REQUESTS} page requests' groups exactly one response (seed ${SEED})`, async () => {
    const c = stack.clients;
    const rnd = createPrng(SEED).next;
    const since = Date.now() - 1;
    const raised = new Set<bigint>();
    let tokens = BigInt(SEED) * 1000n;
    const stats = { requests: 0, multi: 0, credits: 0, unbinds: 0, crashes: 0, success: 0, invalid: 0, ignored: 0 };

    interface Slot {
      guest: Guest;
      watch: Watch;
      handled: number;
      bound: boolean;
    }
    const slots: Slot[] = [];

    const startGuest = async (i: number): Promise<Slot> => {
      const deviceId = `st-${i}`;
      let guest: Guest | undefined;
      // After a crash the device is unassigned once the old container is released: retry until then.
      await waitFor(
        async () => {
          try {
            guest = await openGuest(c, ++tokens, deviceId, 100 + i);
            return true;
          } catch (err) {
            if (isDomainError(err, "DEVICE_BUSY")) return false;
            throw err;
          }
        },
        { timeoutMs: 20_000, intervalMs: 50, message: `device ${deviceId} free for a new guest` },
      );
      const slot: Slot = { guest: guest!, watch: await watchFaults(c, guest!.containerId), handled: 0, bound: true };
      return slot;
    };

    /** The guest's fault handler: answers what arrived since last time, at random. */
    const handle = async (slot: Slot) => {
      const groups = slot.watch.groups();
      while (slot.handled < groups.length) {
        const g = groups[slot.handled++]!;
        const roll = rnd();
        try {
          if (roll < 0.6) {
            for (const r of g.requests) {
              await c.vfio
                .mapGuestPages(
                  P(vfio.MapGuestPagesRequest, {
                    containerId: slot.guest.containerId,
                    hpasid: g.hpasid,
                    iova: r.address,
                    gpa: gpaOf(r.address),
                    size: PAGE,
                    access: { read: true, write: true },
                  }),
                )
                .catch(tolerate);
            }
            await c.vfio.sendPageResponse({
              containerId: slot.guest.containerId,
              faultGroupId: g.faultGroupId,
              code: vfio.PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS,
            });
            stats.success++;
          } else if (roll < 0.8) {
            await c.vfio.sendPageResponse({
              containerId: slot.guest.containerId,
              faultGroupId: g.faultGroupId,
              code: vfio.PageResponseCode.PAGE_RESPONSE_CODE_INVALID,
            });
            stats.invalid++;
          } else stats.ignored++; // left to the timeout
        } catch (err) {
          tolerate(err);
        }
      }
    };

    for (let i = 0; i < DEVICES; i++) {
      await registerDevice(c, `st-${i}`, { priCredits: 16 });
      slots.push(await startGuest(i));
    }

    const prgiNext = new Array<number>(DEVICES).fill(0);
    const perDevice = Math.ceil(REQUESTS / DEVICES);
    await Promise.all(
      slots.map(async (_, i) => {
        for (let n = 0; n < perDevice; n++) {
          const slot = slots[i]!;
          const { guest } = slot;
          const roll = rnd();
          if (roll < 0.004) {
            // The VMM crashes: its session ends; a new guest takes the device.
            stats.crashes++;
            slot.watch.stop();
            guest.session.abort();
            slots[i] = await startGuest(i);
            continue;
          }
          if (roll < 0.01 && slot.bound) {
            // The guest unbinds (handle teardown), then binds again.
            stats.unbinds++;
            const ref = { ref: { $case: "deviceId" as const, value: guest.deviceId } };
            await c.vfio
              .unbindGuestPasid(
                P(vfio.UnbindGuestPasidRequest, { containerId: guest.containerId, device: ref, hpasid: guest.hpasid, generation: guest.generation }),
              )
              .catch(tolerate);
            await c.vfio
              .bindGuestPasid(
                P(vfio.BindGuestPasidRequest, {
                  containerId: guest.containerId,
                  device: ref,
                  hpasid: guest.hpasid,
                  generation: guest.generation,
                  gpasid: guest.gpasid,
                  guestPgtable: 0x5000n,
                }),
              )
              .catch(tolerate);
            continue;
          }
          const page = BigInt(Math.floor(rnd() * 65536));
          const parts = rnd() < 0.3 ? 3 : 1;
          const prgi = parts === 1 ? undefined : prgiNext[i]!++ % 512;
          if (parts > 1) stats.multi++;
          for (let k = 0; k < parts; k++) {
            stats.requests++;
            const r = await dma(c, guest.deviceId, guest.hpasid, GVA_BASE + (page + BigInt(k)) * PAGE, {
              ...(prgi === undefined ? {} : { prgi, last: k === parts - 1 }),
            }).catch((err: unknown) => (tolerate(err), undefined));
            if (r === undefined) break;
            if (r.outcome === OUTCOME.TRANSLATE_OUTCOME_PAGE_REQUEST) raised.add(r.faultGroupId);
            if (r.faultReason === iommu.FaultReason.FAULT_REASON_PRI_CREDITS_EXHAUSTED) {
              stats.credits++;
              break;
            }
            if (r.outcome !== OUTCOME.TRANSLATE_OUTCOME_PAGE_REQUEST) break;
          }
          if (n % 4 === 0) await handle(slots[i]!);
        }
      }),
    );
    for (const s of slots) await handle(s);

    // Heal: nothing outstanding once the timeout has passed.
    await waitFor(async () => (await c.iommu.queryState(P(iommu.QueryStateRequest, {}))).faultGroups.length === 0, {
      timeoutMs: 10_000 + FAULT_TIMEOUT_MS,
      intervalMs: 100,
      message: "every group answered",
    });
    let counts = new Map<bigint, number>();
    await waitFor(
      async () => {
        counts = new Map();
        for (const r of await readHistory(nc, { sinceMs: since })) {
          if (r.role !== "iommu" || r.action.$case !== "pageResponse") continue;
          const id = r.action.value.group;
          counts.set(id, (counts.get(id) ?? 0) + 1);
        }
        return [...raised].every((id) => counts.has(id));
      },
      { timeoutMs: 20_000, intervalMs: 250, message: "every raised group's response in the history" },
    );
    const twice = [...counts].filter(([, n]) => n !== 1);
    const missing = [...raised].filter((id) => counts.get(id) !== 1);
    console.log(`fault stress seed ${SEED}: ${JSON.stringify(stats)}, ${raised.size} groups, ${counts.size} responses recorded`);
    expect(twice, "groups answered more than once").toEqual([]);
    expect(missing, "groups without exactly one response").toEqual([]);
    expect(raised.size).toBeGreaterThan(REQUESTS / 3);
    expect(stats.crashes + stats.unbinds).toBeGreaterThan(0);
    for (const s of slots) {
      s.watch.stop();
      s.guest.session.abort();
    }
  }, 180_000);
});

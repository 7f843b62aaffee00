// Guests on a whole stack, prepared as a VMM does (sections `crash` and `scale`): a VM (KVM), its
// container (VFIO, with a session), an mdev of dedicated work queues (VDCM) assigned to it, and
// PASIDs each allocated (VFIO → core), bound (IOMMU; KVM fills its table from the BIND event) and
// programmed into a work queue (VDCM).
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { addressesOf, connectStack } from "@ioasid/cli";
import { iommu, kvm, vdcm, vfio } from "@ioasid/proto";
import { fmt, now, pool, retrying, serviceNodeArgs } from "./util.mjs";

/** Work queues (and PASID entries) of one simulated DSA device. */
export const WQS_PER_DEVICE = 1024;

/** Deadline of each preparation call: generous, a busy machine's JetStream writes queue up (issue 15). */
export const PREPARE_DEADLINE_MS = Number(process.env.BENCH_PREPARE_DEADLINE_MS ?? 30_000);
/** Attempts of a preparation call that ended in DEADLINE_EXCEEDED or UNAVAILABLE. */
export const PREPARE_ATTEMPTS = 3;
/** Guests prepared at once, and PASIDs of one guest allocated and bound at once (bounded concurrency). */
export const PREPARE_GUESTS = Number(process.env.BENCH_PREPARE_GUESTS ?? 4);
export const PREPARE_PASIDS = Number(process.env.BENCH_PREPARE_PASIDS ?? 16);

/**
 * Brings up the whole stack for a section (owned by it: brought down when the section ends) and
 * connects to it. BENCH_SERVICE_NODE_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof" passes node options
 * to every service; without it, BENCH_PROFILE=1 profiles every service of the stack into
 * bench/results/profiles/<section>/ (one CPU.*.cpuprofile per process, written when it stops).
 */
export async function wholeStack(ctx, section) {
  const dir = mkdtempSync(join(tmpdir(), "ioasid-bench-"));
  const basePort = 30_000 + Math.floor(Math.random() * 20_000);
  const nodeArgs = serviceNodeArgs(section ?? "stack");
  ctx.phase("starting the stack");
  const state = await ctx.stackUp({ dir, basePort, natsPort: basePort + 10, readyTimeoutMs: 30_000, nodeArgs });
  const c = await connectStack(addressesOf(state));
  // Registered after the stack: closed before it is brought down.
  ctx.own("stack clients", () => c.close());
  return { c, dir, state };
}

const retryable = (err) => err?.reason === "DEADLINE_EXCEEDED" || err?.reason === "UNAVAILABLE";

/**
 * Guests on one stack. `prepare(perGuest)` makes one; every preparation call has a long deadline
 * ({@link PREPARE_DEADLINE_MS}) and is retried on DEADLINE_EXCEEDED / UNAVAILABLE (BindGuestPasid
 * is idempotent: a second bind answers firstBind false; the container's quota leaves room for an
 * Alloc lost to a deadline). `stats` counts the retries.
 */
export function guestFactory(ctx, c) {
  let devices = 0;
  let nextWq = WQS_PER_DEVICE; // no device yet
  let token = 1n;
  const stats = { guests: 0, pasids: 0, retries: 0, retriedCalls: new Map() };
  const call = (what, fn) =>
    retrying(() => fn({ deadlineMs: PREPARE_DEADLINE_MS }), {
      attempts: PREPARE_ATTEMPTS,
      retryOn: retryable,
      delayMs: 200,
      onRetry: () => {
        stats.retries++;
        stats.retriedCalls.set(what, (stats.retriedCalls.get(what) ?? 0) + 1);
      },
    });

  /** `n` consecutive work queues of one device, registering a new device when needed. */
  const takeWqs = async (n) => {
    if (n > WQS_PER_DEVICE) throw new Error(`a guest of ${n} PASIDs needs more work queues than one device has (${WQS_PER_DEVICE})`);
    if (nextWq + n > WQS_PER_DEVICE) {
      const d = devices++;
      nextWq = 0;
      const wqs = Array.from({ length: WQS_PER_DEVICE }, (_, wqId) => ({ wqId, mode: vdcm.WqMode.WQ_MODE_DEDICATED, size: 1 }));
      await c.vdcm.registerDevice(vdcm.RegisterDeviceRequest.fromPartial({ deviceId: `dsa${d}`, maxPasidEntries: WQS_PER_DEVICE, wqs }));
      await c.iommu.registerDevice(
        iommu.RegisterDeviceRequest.fromPartial({
          deviceId: `dsa${d}`,
          maxPasids: 1 << 20,
          priCapable: true,
          function: iommu.DeviceFunction.DEVICE_FUNCTION_PF,
          iommuGroup: d + 1,
        }),
      );
    }
    const wq0 = nextWq;
    nextWq += n;
    return { device: `dsa${devices - 1}`, wq0 };
  };
  // Devices are registered one at a time (takeWqs is not reentrant across an await).
  let wqLock = Promise.resolve();
  const wqsFor = (n) => {
    const taken = wqLock.then(() => takeWqs(n));
    wqLock = taken.catch(() => undefined);
    return taken;
  };

  /**
   * An empty guest: VM, container (quota `quota`) with its session attached, and an mdev of
   * `wqCount` work queues assigned. Abort `session` to crash it.
   */
  const empty = async (quota, wqCount) => {
    const { device, wq0 } = await wqsFor(wqCount);
    const mm = token++;
    const name = `g${mm}`;
    const vm = (await call("CreateVm", (o) => c.kvm.createVm(kvm.CreateVmRequest.fromPartial({ mmToken: mm, vcpuCount: 1, vmName: name }), o))).vm;
    // 1 MiB of host memory each (they map none): a thousand guests fit VFIO's default 64 GiB pool.
    const opened = await call("OpenContainer", (o) =>
      c.vfio.openContainer(vfio.OpenContainerRequest.fromPartial({ mmToken: mm, quota, vmName: name, guestMemorySize: 0x10_0000n }), o),
    );
    // Aborted to crash the guest; otherwise it ends with the stack, when the section ends.
    const session = new AbortController();
    const attached = new Promise((resolve, reject) => {
      void (async () => {
        try {
          for await (const m of c.vfio.session({ containerId: opened.containerId }, { signal: session.signal })) if (m.event?.$case === "attached") resolve();
          reject(new Error(`the session of container ${opened.containerId} ended before it attached`));
        } catch (err) {
          // ended by the benchmark, or refused
          reject(err);
        }
      })();
    });
    attached.catch(() => undefined);
    await ctx.within(attached, PREPARE_DEADLINE_MS, `the session of container ${opened.containerId} (${name}) to attach`);
    const mdev = `mdev-${name}`;
    await call("CreateMdev", (o) =>
      c.vdcm.createMdev(
        vdcm.CreateMdevRequest.fromPartial({ parentDeviceId: device, mdevUuid: mdev, wqIds: Array.from({ length: wqCount }, (_, i) => wq0 + i) }),
        o,
      ),
    );
    await call("AssignDevice", (o) =>
      c.vfio.assignDevice(vfio.AssignDeviceRequest.fromPartial({ containerId: opened.containerId, device: { ref: { $case: "mdevUuid", value: mdev } } }), o),
    );
    return { name, setId: opened.setId, containerId: opened.containerId, session, vmId: vm.vmId, mdev };
  };

  /** Allocates and binds one PASID of guest `g` as guest PASID `gpasid`. */
  const allocBind = async (g, gpasid) => {
    const a = await call("AllocPasid", (o) => c.vfio.allocPasid({ containerId: g.containerId }, o));
    await call("BindGuestPasid", (o) =>
      c.vfio.bindGuestPasid(
        vfio.BindGuestPasidRequest.fromPartial({
          containerId: g.containerId,
          device: { ref: { $case: "mdevUuid", value: g.mdev } },
          hpasid: a.hpasid,
          generation: a.generation,
          gpasid,
          guestPgtable: 0x1000n,
        }),
        o,
      ),
    );
    return a;
  };

  /** A guest with `perGuest` PASIDs bound and programmed, and its VMM session open. */
  const prepare = async (perGuest) => {
    const g = await empty(perGuest + PREPARE_ATTEMPTS, perGuest);
    await pool(perGuest, PREPARE_PASIDS, (i) => allocBind(g, i + 1), { signal: ctx.signal });
    // KVM's table is filled by the BIND events; wait for it before the guest programs its WQs.
    let translations = 0;
    await ctx.waitFor(
      async () => {
        translations = (await c.kvm.queryState({ vmId: g.vmId })).vms[0]?.translations.length ?? 0;
        return translations === perGuest;
      },
      { timeoutMs: PREPARE_DEADLINE_MS, intervalMs: 5, what: `KVM to hold the ${perGuest} translations of ${g.name}`, progress: () => `${translations}` },
    );
    await pool(perGuest, PREPARE_PASIDS, (i) => call("WriteWqPasid", (o) => c.vdcm.writeWqPasid({ mdevUuid: g.mdev, virtualWq: i, gpasid: i + 1 }, o)), {
      signal: ctx.signal,
    });
    stats.guests++;
    stats.pasids += perGuest;
    return g;
  };

  /**
   * `count` guests of `perGuest` PASIDs, {@link PREPARE_GUESTS} at a time, with a progress line
   * every `every` guests. Resolves with the guests and the seconds it took.
   */
  const prepareMany = async (count, perGuest, { log, every = 100, label = "" } = {}) => {
    const t = now();
    let ready = 0;
    ctx.phase(
      `preparing ${fmt(count)} guests × ${perGuest} PASIDs${label}`,
      () => `${fmt(ready)} of ${fmt(count)} guests ready, ${stats.retries} calls retried`,
    );
    const guests = await pool(
      count,
      PREPARE_GUESTS,
      async () => {
        const g = await prepare(perGuest);
        if (++ready % every === 0 && log !== undefined)
          log(`  … ${fmt(ready)} guests ready (${fmt((now() - t) / 1000, 1)} s, ${stats.retries} preparation calls retried)`);
        return g;
      },
      { signal: ctx.signal },
    );
    return { guests, seconds: (now() - t) / 1000 };
  };

  return { empty, allocBind, prepare, prepareMany, stats, call };
}

/** The retried preparation calls, for a log line: "3 (BindGuestPasid 2, AllocPasid 1)". */
export function describeRetries(stats) {
  if (stats.retries === 0) return "0";
  return `${stats.retries} (${[...stats.retriedCalls].map(([k, n]) => `${k} ${n}`).join(", ")})`;
}

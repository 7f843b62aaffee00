import { eventOf, publisherGaps, readHistory, type HistoryRecord } from "@ioasid/bus";
import { Code, isDomainError } from "@ioasid/errors";
import { iommu, kvm, vdcm, vfio } from "@ioasid/proto";
import type { StackClients } from "./clients.js";
import { buildTimeline, type TimelineRow } from "./timeline.js";
import { checkInvariants, type Verdict } from "./verdict.js";

/** The two life cycles of the IOASID document. */
export const ScenarioKind = {
  /** Guest IOASID life cycle, normal operation (steps 1–24). */
  NORMAL: "normal",
  /** Misbehaving / crashed guest: free before unbind (steps 13–30). */
  CRASH: "crash",
} as const;
export type ScenarioKind = (typeof ScenarioKind)[keyof typeof ScenarioKind];

/** What a scenario run produced. */
export interface ScenarioResult {
  readonly kind: ScenarioKind;
  readonly hpasid: number;
  readonly gpasid: number;
  readonly setId: number;
  readonly generation: number;
  /** The history of the run (every component), in time order. */
  readonly records: readonly HistoryRecord[];
  /** The document's column table for the scenario's IOASID. */
  readonly rows: readonly TimelineRow[];
  readonly verdict: Verdict;
  /** Notes on what the guest saw (the late unbind's outcome, the reuse of the IOASID). */
  readonly notes: readonly string[];
}

/** Options of {@link runScenario}. */
export interface ScenarioOptions {
  /** The VM's MM token. @default derived from the clock (unique per run) */
  readonly mmToken?: bigint;
  /** Guest PASID the guest uses. @default 101 (as in the document) */
  readonly gpasid?: number;
  /** Physical device (VDCM and IOMMU). @default "idxd0" */
  readonly deviceId?: string;
  /** Progress lines. */
  readonly log?: (line: string) => void;
  /** Longest wait for an asynchronous step (event delivery). @default 10000 */
  readonly stepTimeoutMs?: number;
}

const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);

async function until(what: string, cond: () => Promise<boolean>, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await cond()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

async function ignoreExists<T>(p: Promise<T>): Promise<T | undefined> {
  try {
    return await p;
  } catch (err) {
    if (isDomainError(err) && /EXISTS$/.test(err.reason)) return undefined;
    throw err;
  }
}

/**
 * Runs one of the document's life cycles through the real services: the caller plays the VMM
 * (VFIO calls, holding the container's Session) and the guest (MMIO writes to the mdev through
 * VDCM, ENQCMD through KVM), then reads the recorded history and checks the invariants.
 */
export async function runScenario(kind: ScenarioKind, c: StackClients, options: ScenarioOptions = {}): Promise<ScenarioResult> {
  const log = options.log ?? (() => undefined);
  const timeout = options.stepTimeoutMs ?? 10_000;
  const token = options.mmToken ?? BigInt(Date.now()) * 1000n + BigInt(Math.floor(Math.random() * 1000));
  const gpasid = options.gpasid ?? 101;
  const deviceId = options.deviceId ?? "idxd0";
  const mdevUuid = `mdev-${token.toString(16)}`;
  const vmName = `${kind}-${token.toString(16)}`;
  const notes: string[] = [];
  const since = performance.timeOrigin + performance.now();

  // Host setup (not in the table): the physical device in VDCM and in the IOMMU.
  await ignoreExists(
    c.vdcm.registerDevice(
      P(vdcm.RegisterDeviceRequest, {
        deviceId,
        maxPasidEntries: 64,
        wqs: [
          { wqId: 0, mode: vdcm.WqMode.WQ_MODE_DEDICATED, size: 16 },
          { wqId: 1, mode: vdcm.WqMode.WQ_MODE_SHARED, size: 32 },
        ],
      }),
    ),
  );
  await ignoreExists(
    c.iommu.registerDevice(
      P(iommu.RegisterDeviceRequest, { deviceId, maxPasids: 1 << 20, priCapable: true, function: iommu.DeviceFunction.DEVICE_FUNCTION_PF, iommuGroup: 1 }),
    ),
  );
  // The mdev is removed whatever happens after it is asked for — a create that a failover cut
  // (DEADLINE_EXCEEDED) may still have been made — so that no run leaves work queue 0 taken for
  // the next (the compose cluster test's normal run after a cut crash run: WQ_IN_USE).
  try {
    await c.vdcm.createMdev(P(vdcm.CreateMdevRequest, { parentDeviceId: deviceId, mdevUuid, wqIds: [0] }));

    // 1. KVM registers by MM token (pending until the set exists); VFIO opens the container (the
    //    VM's set) and VDCM registers on it when the mdev is assigned.
    log(`[${kind}] 1  KVM CreateVm (registration by MM token ${token}), VFIO OpenContainer, assign ${mdevUuid}`);
    const vm = (await c.kvm.createVm(P(kvm.CreateVmRequest, { mmToken: token, vcpuCount: 2, vmName }))).vm!;
    const container = await c.vfio.openContainer(P(vfio.OpenContainerRequest, { mmToken: token, quota: 16, vmName }));
    const setId = container.setId;
    const session = new AbortController();
    const sessionDone = (async () => {
      try {
        for await (const _ of c.vfio.session({ containerId: container.containerId }, { signal: session.signal })) void _;
      } catch {
        // ended by us (abort) or by the container closing
      }
    })();
    try {
      await c.vfio.assignDevice(P(vfio.AssignDeviceRequest, { containerId: container.containerId, device: { ref: { $case: "mdevUuid", value: mdevUuid } } }));
      await until(
        "KVM's registration to become active",
        async () => (await c.kvm.queryState({ vmId: vm.vmId })).vms[0]?.registration === kvm.RegistrationState.REGISTRATION_STATE_ACTIVE,
        timeout,
      );

      // 2. ioasid_alloc() through the virtual command.
      const a = await c.vfio.allocPasid(P(vfio.AllocPasidRequest, { containerId: container.containerId }));
      const hpasid = a.hpasid;
      log(`[${kind}] 2  AllocPasid -> host PASID ${hpasid} (generation ${a.generation})`);
      // The guest binds through its mdev (VFIO binds the PASID on the mdev's parent device).
      const device = { ref: { $case: "mdevUuid", value: mdevUuid } };

      // 3–7. bind_gpasid: the IOMMU takes a reference and attaches the SPID (BIND); KVM takes one
      //      and updates its VMCS PASID translation table.
      await c.vfio.bindGuestPasid(
        P(vfio.BindGuestPasidRequest, { containerId: container.containerId, device, hpasid, generation: a.generation, gpasid, guestPgtable: 0x1000n }),
      );
      await until(
        "KVM's VMCS entry for the BIND",
        async () => ((await c.kvm.queryState({ vmId: vm.vmId })).vms[0]?.translations ?? []).some((t) => t.hpasid === hpasid),
        timeout,
      );
      log(`[${kind}] 3-7  BindGuestPasid ${gpasid} -> ${hpasid}: BIND delivered, VMCS updated`);

      // 8–11. The guest writes its PASID into the mdev's work queue: VDCM translates with
      //       find_by_spid (a reference) and programs the host PASID.
      await c.vdcm.writeWqPasid(P(vdcm.WriteWqPasidRequest, { mdevUuid, virtualWq: 0, gpasid }));
      log(`[${kind}] 8-11 mdev_write(${gpasid}): VDCM programmed host PASID ${hpasid}`);

      // 12. Guest starts DMA: ENQCMD with IA32_PASID = valid | gpasid, translated by KVM, submitted.
      const enq = await c.kvm.enqcmd(P(kvm.EnqcmdRequest, { vmId: vm.vmId, vcpu: 0, ia32Pasid: (0x8000_0000 | gpasid) >>> 0 }));
      if (enq.outcome !== kvm.EnqcmdOutcome.ENQCMD_OUTCOME_TRANSLATED || enq.hpasid !== hpasid) {
        throw new Error(`ENQCMD of guest PASID ${gpasid} was not translated to ${hpasid} (${kvm.enqcmdOutcomeToJSON(enq.outcome)})`);
      }
      notes.push(`ENQCMD guest PASID ${gpasid} -> host PASID ${enq.hpasid}`);

      if (kind === ScenarioKind.NORMAL) {
        // 13–16. Guest stops DMA and clears the PASID: VDCM drains, clears, puts.
        await c.vdcm.clearWqPasid(P(vdcm.ClearWqPasidRequest, { mdevUuid, virtualWq: 0 }));
        log(`[${kind}] 14-16 mdev_clear: VDCM drained and cleared ${hpasid}`);
        // 17–21. unbind_gpasid: the last unbind detaches the SPID (UNBIND); KVM clears and puts.
        await c.vfio.unbindGuestPasid(
          P(vfio.UnbindGuestPasidRequest, { containerId: container.containerId, device, hpasid, generation: a.generation, gpasid }),
        );
        await until(
          "KVM to handle the UNBIND",
          async () => !((await c.kvm.queryState({ vmId: vm.vmId })).vms[0]?.translations ?? []).some((t) => t.hpasid === hpasid),
          timeout,
        );
        log(`[${kind}] 17-21 UnbindGuestPasid: UNBIND delivered, VMCS entry removed`);
        // 22–24. ioasid_free(): FREE to the IOMMU, which puts the last reference: reclaimed.
        await c.vfio.freePasid(P(vfio.FreePasidRequest, { containerId: container.containerId, hpasid, generation: a.generation }));
        await reclaimed(c, hpasid, a.generation, timeout);
        log(`[${kind}] 22-24 FreePasid: reclaimed`);
      } else {
        // 14–28. The guest misbehaves: free before unbind. FREE goes CPU → DEVICE → IOMMU; each
        //        clears its context and releases its reference; reclaimed at the last.
        await c.vfio.freePasid(P(vfio.FreePasidRequest, { containerId: container.containerId, hpasid, generation: a.generation }));
        log(`[${kind}] 15-17 FreePasid before unbind: FREE_PENDING`);
        await reclaimed(c, hpasid, a.generation, timeout);
        log(`[${kind}] 18-28 KVM, VDCM, IOMMU cleared and released: reclaimed`);
        // 29–30. The late unbind fails harmlessly.
        try {
          const late = await c.vfio.unbindGuestPasid(
            P(vfio.UnbindGuestPasidRequest, { containerId: container.containerId, device, hpasid, generation: a.generation, gpasid }),
          );
          notes.push(`late unbind_gpasid: unbound=${late.unbound} (nothing to unbind)`);
        } catch (err) {
          notes.push(`late unbind_gpasid refused harmlessly: ${isDomainError(err) ? err.reason : String(err)}`);
        }
        log(`[${kind}] 29-30 late unbind: ${notes.at(-1)}`);
      }

      // New life cycle: the IOASID can be allocated again (at a new generation).
      const again = await c.vfio.allocPasid(P(vfio.AllocPasidRequest, { containerId: container.containerId }));
      notes.push(`new life cycle: ioasid_alloc() -> ${again.hpasid} generation ${again.generation}`);
      await c.vfio.freePasid(P(vfio.FreePasidRequest, { containerId: container.containerId, hpasid: again.hpasid, generation: again.generation }));

      const until0 = performance.timeOrigin + performance.now();
      // History records are published asynchronously: wait until the reclaim of this run is stored,
      // and until no publisher's numbering has a hole — a record a server's death or a leader
      // election held up, which its publisher sends again (history outbox). A hole still there after
      // SETTLE_MS is left to the verdict, which then judges the history it has.
      let records: HistoryRecord[] = [];
      let reclaimSeenAt: number | undefined;
      await until(
        "the run's history",
        async () => {
          records = (await readHistory(c.nc, { sinceMs: since })).filter((r) => r.ts <= until0 + 1000);
          if (!records.some((r) => eventOf(r) === "RECLAIM" && r.ioasid === hpasid && r.generation === a.generation)) return false;
          reclaimSeenAt ??= Date.now();
          return publisherGaps(records).length === 0 || Date.now() - reclaimSeenAt >= HISTORY_SETTLE_MS;
        },
        timeout + HISTORY_SETTLE_MS,
      );
      const holes = publisherGaps(records);
      if (holes.length > 0)
        notes.push(`history with holes after ${HISTORY_SETTLE_MS} ms: ${holes.map((g) => `${g.publisher} ${g.after}..${g.before}`).join(", ")}`);
      const rows = buildTimeline(records, {
        ioasids: new Set([hpasid]),
        setIds: new Set([setId]),
        // KVM's registration by MM token (step 1) was made before the set existed.
        include: (r) => r.action?.$case === "ioasidRegisterNotifierMm" && r.action.value.scope?.$case === "mmToken" && r.action.value.scope.value === token,
      }).filter((r) => r.record.generation === undefined || r.record.generation === a.generation || r.record.ioasid === undefined);
      const verdict = await checkInvariants(kind, c, { records, hpasid, generation: a.generation, setId, vmId: vm.vmId });
      return { kind, hpasid, gpasid, setId, generation: a.generation, records, rows, verdict, notes };
    } finally {
      session.abort();
      await c.vfio.closeContainer({ containerId: container.containerId }).catch(() => undefined);
      await sessionDone;
      await c.kvm.destroyVm({ vmId: vm.vmId }).catch(() => undefined);
    }
  } finally {
    await removeMdev(c, mdevUuid, log);
  }
}

/** How long a run's clean-up may keep asking VDCM to remove its mdev, ms. */
const CLEANUP_MS = 20_000;

/**
 * Removes a run's mdev: asked again while the answer is transient (a failover: UNAVAILABLE,
 * DEADLINE_EXCEEDED) or the mdev is still assigned (its container's close still unassigning it),
 * for at most {@link CLEANUP_MS}; gone already (or never made) is done. One that cannot be removed is
 * said, not hidden: the next run on the device would find its work queue taken.
 */
async function removeMdev(c: StackClients, mdevUuid: string, log: (line: string) => void): Promise<void> {
  const end = Date.now() + CLEANUP_MS;
  for (;;) {
    try {
      await c.vdcm.destroyMdev({ mdevUuid });
      return;
    } catch (err) {
      if (isDomainError(err, "MDEV_NOT_FOUND")) return;
      const again = isDomainError(err, "MDEV_ASSIGNED") || (isDomainError(err) && (err.code === Code.UNAVAILABLE || err.code === Code.DEADLINE_EXCEEDED));
      if (!again || Date.now() > end) {
        log(`clean-up: mdev ${mdevUuid} not removed: ${err instanceof Error ? err.message : String(err)}`);
        return;
      }
      await new Promise((r) => setTimeout(r, 200));
    }
  }
}

/** How long the run's history may keep a hole in a publisher's numbering before it is judged as it is, ms. */
const HISTORY_SETTLE_MS = 10_000;

async function reclaimed(c: StackClients, ioasid: number, generation: number, timeoutMs: number): Promise<void> {
  await until(
    `IOASID ${ioasid} (generation ${generation}) to be reclaimed`,
    async () => {
      try {
        const info = (await c.core.describe({ ioasid })).info!;
        return info.generation !== generation;
      } catch (err) {
        if (isDomainError(err, "IOASID_NOT_FOUND")) return true;
        throw err;
      }
    },
    timeoutMs,
  );
}

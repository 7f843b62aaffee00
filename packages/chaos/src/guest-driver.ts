import { isDomainError } from "@ioasid/errors";
import { iommu, kvm, vdcm, vfio } from "@ioasid/proto";
import { DefiniteFailure, type ChaosJournal, type OpResult, type OpStart } from "./chaos-journal.js";
import { ChaosOpName, type ChaosOp } from "@ioasid/checker";
import { startVmm, type ChaosClients, type VmmCommand, type VmmProcess } from "./chaos-clients.js";
import { GuestDevice, gpasidOf, type GuestPlan, type GuestStep } from "./guest-plan.js";
import { createPrng } from "./prng.js";

/** The host hardware of one guest slot: a DSA-like device behind VDCM with its mdev, and a PRI-capable PF. */
export interface SlotDevices {
  /** The physical work-queue device (VDCM and IOMMU). */
  readonly deviceId: string;
  /** The mdev composed on it: virtual WQs 0 and 1 dedicated, 2 shared. */
  readonly mdevUuid: string;
  /** A PRI-capable physical function assigned whole (IOMMU only). */
  readonly pfId: string;
  /** Its IOMMU groups (the device's and the PF's). */
  readonly groups: readonly [number, number];
}

/** The devices of slot `slot`. */
export function slotDevices(slot: number): SlotDevices {
  return { deviceId: `dsa${slot}`, mdevUuid: `mdev-s${slot}`, pfId: `pf${slot}`, groups: [10 + slot, 100 + slot] };
}

/** The shared virtual WQ of every slot's mdev. */
export const SHARED_WQ = 2;

/** Guest RAM each VM maps with MapDma (GPA 0 …), at the start of the host memory VFIO gave its container. */
export const GUEST_RAM = { size: 16n << 20n } as const;
/** Where the guests' DMA buffers are in their virtual address space (page n at base + n × 4 KiB). */
export const GUEST_VA_BASE = 0x4000_0000n;
const PAGE = 0x1000n;

/** Registers the slots' devices at VDCM and the IOMMU and composes the mdevs; what exists already is left as it is. */
export async function setupSlots(c: ChaosClients, slots: number): Promise<void> {
  for (let s = 0; s < slots; s++) {
    const d = slotDevices(s);
    await existsOk(
      c.vdcm.registerDevice(
        vdcm.RegisterDeviceRequest.fromPartial({
          deviceId: d.deviceId,
          maxPasidEntries: 64,
          wqs: [
            { wqId: 0, mode: vdcm.WqMode.WQ_MODE_DEDICATED, size: 16 },
            { wqId: 1, mode: vdcm.WqMode.WQ_MODE_DEDICATED, size: 16 },
            { wqId: 2, mode: vdcm.WqMode.WQ_MODE_SHARED, size: 32 },
          ],
        }),
      ),
    );
    await registerIommuDevices(c, d);
    await existsOk(c.vdcm.createMdev(vdcm.CreateMdevRequest.fromPartial({ parentDeviceId: d.deviceId, mdevUuid: d.mdevUuid, wqIds: [0, 1, 2] })));
  }
}

async function registerIommuDevices(c: ChaosClients, d: SlotDevices): Promise<void> {
  for (const [deviceId, group] of [
    [d.deviceId, d.groups[0]],
    [d.pfId, d.groups[1]],
  ] as const) {
    await existsOk(
      c.iommu.registerDevice(
        iommu.RegisterDeviceRequest.fromPartial({
          deviceId,
          maxPasids: 1 << 20,
          priCapable: true,
          function: iommu.DeviceFunction.DEVICE_FUNCTION_PF,
          iommuGroup: group,
        }),
      ),
    );
  }
}

async function existsOk<T>(p: Promise<T>): Promise<void> {
  try {
    await p;
  } catch (err) {
    if (!(isDomainError(err) && /EXISTS$/.test(err.reason))) throw err;
  }
}

/** How a guest ended. */
export interface GuestOutcome {
  readonly plan: GuestPlan;
  readonly setId: number | undefined;
  /**
   * "closed" (clean exit), "crashed" (killed as planned, or after a close that failed), "lost" (its
   * VMM's session ended on its own: VFIO went away), "not-opened".
   */
  readonly end: "closed" | "crashed" | "lost" | "not-opened";
  /** Steps run (skipped ones, naming a PASID never allocated, not counted). */
  readonly stepsRun: number;
  /** PASIDs the guest held when it ended: allocated (ok) and not freed (ok). */
  readonly held: number;
}

/** What a guest needs from the run. */
export interface GuestContext {
  readonly clients: ChaosClients;
  readonly journal: ChaosJournal;
  readonly vfioAddress: string;
  readonly vmmCommand: VmmCommand;
  /** True once the run's duration is over: the guest ends (clean close) at its next step. */
  readonly stopping: () => boolean;
  /** Every VMM process started (the runner kills what is left, by PID). */
  readonly vmms: Set<VmmProcess>;
  /** The VMMs' credentials directory (their certificate): `IOASID_CREDENTIALS_DIR` of each VMM process. */
  readonly vmmCredentialsDir?: string;
  /** Deadline of a page-response wait on the device side, in ms. @default 4000 */
  readonly pageResponseWaitMs?: number;
}

interface Pasid {
  readonly hpasid: number;
  readonly generation: number;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/**
 * Runs one guest's planned life against the stack: KVM CreateVm, the VMM process opening the
 * container, its steps (each a chaos operation: invoke, then ok / fail / info), its page requests
 * answered by the guest as they come (WatchFaults, MapGuestPages, SendPageResponse), and its end —
 * a clean close or a SIGKILL of the VMM at the planned step, in flight or between steps — then KVM
 * DestroyVm (the VM goes with its VMM).
 */
export async function runGuest(plan: GuestPlan, ctx: GuestContext): Promise<GuestOutcome> {
  const { clients: c, journal } = ctx;
  const d = slotDevices(plan.slot);
  const vm = plan.name;
  const pasids = new Map<number, Pasid>();
  const freed = new Set<number>();
  const held = (): number => pasids.size - freed.size;
  // Devices VFIO assigned to this guest: a guest reaches only those (an mdev's MMIO, a PF's DMA).
  // Found by the chaos suite: a guest whose assign failed (DEVICE_BUSY) cleared the mdev of the
  // guest that had it, and the checker rightly reported S3.
  const assigned = new Set<GuestDevice>();
  let setId: number | undefined = undefined; // known once the container is open
  let containerId = 0;
  let vmId: number | undefined;
  let stepsRun = 0;
  const base = (): Pick<ChaosOp, "vm" | "setId"> => ({ vm, ...(setId === undefined ? {} : { setId }) });
  const ids = (k: number): Partial<ChaosOp> => {
    const p = pasids.get(k);
    return { spid: gpasidOf(k), ...(p === undefined ? {} : { ioasid: p.hpasid, generation: p.generation }) };
  };
  const run = <T>(op: string, extra: Partial<OpStart>, call: () => Promise<T>, onOk?: (v: T) => Partial<ChaosOp>): Promise<OpResult<T>> =>
    journal.run({ op, ...base(), ...extra }, call, onOk);

  const created = await run("create-vm", {}, () =>
    c.kvm.createVm(kvm.CreateVmRequest.fromPartial({ mmToken: plan.mmToken, vcpuCount: plan.vcpus, vmName: vm })),
  );
  if (created.ok) vmId = created.value.vm?.vmId;
  const destroyVm = async () => {
    if (vmId !== undefined) await run("destroy-vm", {}, () => c.kvm.destroyVm({ vmId: vmId! }));
  };

  // The VMM: a process of its own holding the VFIO Session (SIGKILL is a real crash of it).
  const openOp = journal.begin({ op: ChaosOpName.OPEN, vm });
  const vmm = startVmm(ctx.vmmCommand, {
    vfioAddress: ctx.vfioAddress,
    mmToken: plan.mmToken,
    quota: plan.quota,
    name: vm,
    ...(ctx.vmmCredentialsDir === undefined ? {} : { credentialsDir: ctx.vmmCredentialsDir }),
  });
  ctx.vmms.add(vmm);
  void vmm.exited.then(() => ctx.vmms.delete(vmm));
  const opened = await Promise.race([
    vmm.opened.then(
      (o) => o,
      (err: Error) => err,
    ),
    sleep(15_000).then(() => new Error("the VMM did not attach its session within 15 s")),
  ]);
  if (opened instanceof Error) {
    // The container may exist without its session: VFIO closes it after its grace period.
    openOp.done("info", { error: opened.message.slice(0, 200) });
    vmm.kill("SIGKILL");
    await vmm.exited;
    await destroyVm();
    return { plan, setId, end: "not-opened", stepsRun, held: held() };
  }
  containerId = opened.containerId;
  setId = opened.setId;
  // The VMM handed its capability over: the driver's calls for this guest carry it.
  c.vfio.remember(containerId, opened.capability);
  openOp.done("ok", { setId });

  let killedByUs = false;
  let lost = false;
  void vmm.exited.then(() => {
    if (!killedByUs) lost = true;
  });
  const crash = async (): Promise<void> => {
    killedByUs = true;
    await journal.run({ op: ChaosOpName.CRASH, ...base() }, async () => {
      vmm.kill("SIGKILL");
      await vmm.exited;
    });
  };

  const responder = answerPageRequests(plan, ctx, containerId, () => setId, vm);
  // A page request raised before the guest's fault stream is attached would find no handler.
  for (let i = 0; i < 40; i++) {
    const state = await c.vfio.queryState({ containerId }).catch(() => undefined);
    if (state === undefined || state.containers[0]?.faultWatcherAttached === true) break;
    await sleep(50);
  }
  try {
    let crashed = false;
    for (let i = 0; i < plan.steps.length && !crashed; i++) {
      if (ctx.stopping() || lost) break;
      const planned = plan.steps[i]!;
      if (plan.end.kind === "crash" && plan.end.atStep === i && plan.end.duringMs === undefined) {
        await crash();
        crashed = true;
        break;
      }
      await sleep(planned.thinkMs);
      if (lost) break;
      const inFlight = plan.end.kind === "crash" && plan.end.atStep === i && plan.end.duringMs !== undefined;
      const killer = inFlight ? sleep((plan.end as { duringMs: number }).duringMs).then(crash) : undefined;
      if (await runStep(planned.step)) stepsRun++;
      if (killer !== undefined) {
        await killer;
        crashed = true;
      }
    }
    if (!crashed && !lost && !ctx.stopping() && plan.end.kind === "crash" && plan.end.atStep >= plan.steps.length) {
      await crash();
      crashed = true;
    }
    if (crashed) {
      await destroyVm();
      return { plan, setId, end: "crashed", stepsRun, held: held() };
    }
    if (lost) {
      // The session ended without us: VFIO went away (killed). The VMM has lost its container.
      const status = await vmm.exited;
      journal
        .begin({ op: ChaosOpName.CRASH, ...base() })
        .done("info", { error: `session lost: the VMM exited (code ${String(status.code)}) when VFIO went away` });
      await destroyVm();
      return { plan, setId, end: "lost", stepsRun, held: held() };
    }
    // The clean exit: CloseContainer, then the VMM process ends.
    const closed = await run(ChaosOpName.CLOSE, {}, () => c.vfio.closeContainer({ containerId }, { deadlineMs: 10_000 }));
    if (!closed.ok) {
      // A VMM whose clean exit failed goes away anyway: its session ends, the crashed-guest path.
      await crash();
      await destroyVm();
      return { plan, setId, end: "crashed", stepsRun, held: held() };
    }
    killedByUs = true;
    vmm.kill("SIGTERM");
    await Promise.race([vmm.exited, sleep(5000)]);
    vmm.kill("SIGKILL");
    await vmm.exited;
    await destroyVm();
    return { plan, setId, end: "closed", stepsRun, held: held() };
  } finally {
    await responder.stop();
  }

  /**
   * A VMM retries its setup (assigning a device, mapping guest RAM) when a call ended indeterminate
   * (a service down or stalled), twice at most, each try its own operation.
   */
  async function setup(call: () => Promise<OpResult<unknown>>): Promise<void> {
    for (let attempt = 0; attempt < 3; attempt++) {
      const r = await call();
      if (r.ok || r.outcome === "fail" || lost || ctx.stopping()) return;
      await sleep(300);
    }
  }

  /** Runs one planned step; false when it was skipped (it names a PASID never allocated). */
  async function runStep(step: GuestStep): Promise<boolean> {
    const device = (dev: GuestDevice) => ({
      ref: dev === GuestDevice.MDEV ? { $case: "mdevUuid" as const, value: d.mdevUuid } : { $case: "deviceId" as const, value: d.pfId },
    });
    const p = "pasid" in step ? pasids.get(step.pasid) : undefined;
    if ("pasid" in step && step.kind !== "alloc" && p === undefined) return false;
    switch (step.kind) {
      case "assign":
        await setup(async () => {
          const r = await run("assign", {}, () => c.vfio.assignDevice(vfio.AssignDeviceRequest.fromPartial({ containerId, device: device(step.device) })));
          if (r.ok) assigned.add(step.device);
          return r;
        });
        return true;
      case "map-dma":
        await setup(() =>
          run("map-dma", {}, async () => {
            // Only host memory VFIO gave this VM maps (issue 14): QueryState shows where it is.
            const given = (await c.vfio.queryState({ containerId })).containers[0]?.guestMemory[0];
            return c.vfio.mapDma({
              containerId,
              iova: 0n,
              paddr: given?.paddr ?? 0n,
              size: GUEST_RAM.size,
              access: { read: true, write: true, execute: false, privileged: false },
            });
          }),
        );
        return true;
      case "alloc": {
        const r = await run(
          ChaosOpName.ALLOC,
          {},
          () => c.vfio.allocPasid({ containerId }),
          (a) => ({ ioasid: a.hpasid, generation: a.generation }),
        );
        if (r.ok) pasids.set(step.pasid, { hpasid: r.value.hpasid, generation: r.value.generation });
        return true;
      }
      case "bind":
        await run(ChaosOpName.BIND, ids(step.pasid), () =>
          c.vfio.bindGuestPasid(
            vfio.BindGuestPasidRequest.fromPartial({
              containerId,
              device: device(step.device),
              hpasid: p!.hpasid,
              generation: p!.generation,
              gpasid: gpasidOf(step.pasid),
              guestPgtable: 0x10_0000n + BigInt(step.pasid) * PAGE,
            }),
          ),
        );
        return true;
      case "unbind":
        await run(ChaosOpName.UNBIND, ids(step.pasid), () =>
          c.vfio.unbindGuestPasid(
            vfio.UnbindGuestPasidRequest.fromPartial({
              containerId,
              device: device(step.device),
              hpasid: p!.hpasid,
              generation: p!.generation,
              gpasid: gpasidOf(step.pasid),
            }),
          ),
        );
        return true;
      case "free": {
        const r = await run(ChaosOpName.FREE, ids(step.pasid), () => c.vfio.freePasid({ containerId, hpasid: p!.hpasid, generation: p!.generation }));
        if (r.ok) freed.add(step.pasid);
        return true;
      }
      case "program":
        if (!assigned.has(GuestDevice.MDEV)) return false;
        await run(ChaosOpName.PROGRAM, ids(step.pasid), () => c.vdcm.writeWqPasid({ mdevUuid: d.mdevUuid, virtualWq: step.wq, gpasid: gpasidOf(step.pasid) }));
        return true;
      case "clear":
        if (!assigned.has(GuestDevice.MDEV)) return false;
        await run(
          ChaosOpName.CLEAR,
          {},
          () => c.vdcm.clearWqPasid({ mdevUuid: d.mdevUuid, virtualWq: step.wq }),
          (r) => (r.cleared ? { ioasid: r.hpasid, generation: r.generation, spid: r.gpasid } : {}),
        );
        return true;
      case "enqcmd":
        await enqcmd(step.pasid, step.submit);
        return true;
      case "dma":
        if (!assigned.has(step.device)) return false;
        await dma(step.pasid, p!, step.device, step.wq, step.page);
        return true;
      case "overflow": {
        if (!assigned.has(GuestDevice.PF)) return false;
        // vIOMMU, vdevice, a queue of depth 2, the PF's RID nested on the vIOMMU, then 4 DMA faults
        // (stage-2 misses past guest RAM): the guest must read a LOST_EVENTS marker, never a hole.
        await run("overflow", {}, async () => {
          const pf = device(GuestDevice.PF);
          const v = (await c.vfio.allocViommu(vfio.AllocViommuRequest.fromPartial({ containerId, device: pf }))).viommu!;
          await c.vfio.allocVdevice(vfio.AllocVdeviceRequest.fromPartial({ containerId, viommuId: v.viommuId, device: pf, virtId: 7n }));
          const q = (await c.vfio.allocVeventq(vfio.AllocVeventqRequest.fromPartial({ containerId, viommuId: v.viommuId, depth: 2 }))).veventq!;
          await c.vfio.replaceDeviceDomain(
            vfio.ReplaceDeviceDomainRequest.fromPartial({ containerId, device: pf, guestPgtable: 0x7e_0000n, viommuId: v.viommuId }),
          );
          for (let i = 0n; i < 4n; i++) {
            await c.iommu.translate(
              iommu.TranslateRequest.fromPartial({
                deviceId: d.pfId,
                withoutPasid: true,
                address: GUEST_RAM.size + i * PAGE,
                access: { read: true, write: false },
              }),
            );
          }
          const items = (await c.vfio.readVeventq(vfio.ReadVeventqRequest.fromPartial({ containerId, veventqId: q.veventqId }))).items;
          if (!items.some((it) => it.item?.$case === "lostEvents")) {
            throw new DefiniteFailure(`no LOST_EVENTS marker after 4 faults into a queue of depth 2 (${items.length} items read)`);
          }
        });
        return true;
      }
      case "replace":
        if (!assigned.has(GuestDevice.PF)) return false;
        // The guest turns its vIOMMU's nested translation on or off for the PF: one atomic replace.
        await run("replace", {}, () =>
          c.vfio.replaceDeviceDomain(
            vfio.ReplaceDeviceDomainRequest.fromPartial({ containerId, device: device(GuestDevice.PF), guestPgtable: step.nested ? 0x7f_0000n : 0n }),
          ),
        );
        return true;
    }
  }

  /** A vCPU's ENQCMD: translated (ok, the host PASID it gave) or #GP (fail); a translated one may go to the shared WQ. */
  async function enqcmd(k: number, submit: boolean): Promise<void> {
    if (vmId === undefined) return;
    const r = await run(
      ChaosOpName.ENQCMD,
      { spid: gpasidOf(k) },
      async () => {
        const res = await c.kvm.enqcmd({ vmId: vmId!, vcpu: k % plan.vcpus, ia32Pasid: (0x8000_0000 | gpasidOf(k)) >>> 0 });
        if (res.outcome !== kvm.EnqcmdOutcome.ENQCMD_OUTCOME_TRANSLATED) throw new DefiniteFailure(kvm.gpCauseToJSON(res.gpCause));
        return res;
      },
      (res) => ({ ioasid: res.hpasid, generation: res.generation }),
    );
    if (!r.ok || !submit || !assigned.has(GuestDevice.MDEV)) return;
    await run("submit", { ioasid: r.value.hpasid, generation: r.value.generation, spid: gpasidOf(k) }, () =>
      c.vdcm.submitDescriptor(
        vdcm.SubmitDescriptorRequest.fromPartial({
          mdevUuid: d.mdevUuid,
          virtualWq: SHARED_WQ,
          pasid: r.value.hpasid,
          pasidSpace: vdcm.PasidSpace.PASID_SPACE_HOST,
          generation: r.value.generation,
          descriptor: { op: vdcm.DescriptorOp.DESCRIPTOR_OP_NOOP, srcAddress: 0n, dstAddress: 0n, size: 0n },
        }),
      ),
    );
  }

  /**
   * Device DMA under a PASID: a FILL descriptor on a programmed dedicated WQ (the mdev's parent
   * device) or a Translate by the PF. A page request is answered by the guest (the responder);
   * the device waits for the answer (AwaitPageResponse) and, on SUCCESS, retries once. ok: the DMA
   * completed; fail: it faulted or was answered otherwise.
   */
  async function dma(k: number, p: Pasid, dev: GuestDevice, wq: number | undefined, page: number): Promise<void> {
    const gva = GUEST_VA_BASE + BigInt(page) * PAGE;
    const deviceId = dev === GuestDevice.MDEV ? d.deviceId : d.pfId;
    const attempt = async (): Promise<{ done: boolean; group?: bigint; why?: string }> => {
      if (dev === GuestDevice.MDEV) {
        const r = await c.vdcm.submitDescriptor(
          vdcm.SubmitDescriptorRequest.fromPartial({
            mdevUuid: d.mdevUuid,
            virtualWq: wq ?? 0,
            descriptor: { op: vdcm.DescriptorOp.DESCRIPTOR_OP_FILL, srcAddress: 0n, dstAddress: gva, size: PAGE },
          }),
        );
        if (r.status === vdcm.CompletionStatus.COMPLETION_STATUS_SUCCESS) return { done: true };
        if (r.status === vdcm.CompletionStatus.COMPLETION_STATUS_PAGE_REQUEST) return { done: false, group: r.faultGroupId };
        return { done: false, why: vdcm.completionStatusToJSON(r.status) };
      }
      const r = await c.iommu.translate(iommu.TranslateRequest.fromPartial({ deviceId, pasid: p.hpasid, address: gva, access: { read: true, write: true } }));
      if (r.outcome === iommu.TranslateOutcome.TRANSLATE_OUTCOME_TRANSLATED) return { done: true };
      if (r.outcome === iommu.TranslateOutcome.TRANSLATE_OUTCOME_PAGE_REQUEST) return { done: false, group: r.faultGroupId };
      return { done: false, why: iommu.faultReasonToJSON(r.faultReason) };
    };
    await run(ChaosOpName.DMA, ids(k), async () => {
      const first = await attempt();
      if (first.done) return;
      if (first.group === undefined) throw new DefiniteFailure(first.why ?? "DMA fault");
      const answer = await c.iommu.awaitPageResponse({ deviceId, faultGroupId: first.group }, { deadlineMs: ctx.pageResponseWaitMs ?? 4000 });
      if (answer.code !== iommu.PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS)
        throw new DefiniteFailure(`${iommu.pageResponseCodeToJSON(answer.code)} (${iommu.pageResponseSourceToJSON(answer.source)})`);
      const retry = await attempt();
      if (!retry.done) throw new DefiniteFailure(`retry: ${retry.why ?? "page request again"}`);
    });
  }
}

/**
 * The guest's side of its IO page faults: a WatchFaults stream (re-opened while the guest lives if
 * it breaks), and for each group relayed to it an answer drawn from the guest's responder seed —
 * mostly SUCCESS after installing the requested pages (MapGuestPages, GVA page n → GPA page n),
 * sometimes INVALID, sometimes none (the IOMMU answers INVALID at its timeout). Each answer is a
 * `respond` operation.
 */
function answerPageRequests(plan: GuestPlan, ctx: GuestContext, containerId: number, setIdOf: () => number | undefined, vm: string): { stop(): Promise<void> } {
  const rng = createPrng(plan.responderSeed);
  const ac = new AbortController();
  const seen = new Set<bigint>();
  const answering = new Set<Promise<unknown>>();
  const c = ctx.clients;
  const loop = (async () => {
    while (!ac.signal.aborted) {
      try {
        for await (const m of c.vfio.watchFaults({ containerId }, { signal: ac.signal })) {
          if (m.item?.$case !== "group" || seen.has(m.item.value.faultGroupId)) continue;
          const g = m.item.value;
          seen.add(g.faultGroupId);
          const x = rng.next();
          if (x >= 0.95) continue; // the guest never answers: the IOMMU's timeout does
          const code = x < 0.85 ? vfio.PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS : vfio.PageResponseCode.PAGE_RESPONSE_CODE_INVALID;
          const setId = setIdOf();
          const answer = ctx.journal.run(
            { op: ChaosOpName.RESPOND, vm, ...(setId === undefined ? {} : { setId }), ioasid: g.hpasid, spid: g.gpasid },
            async () => {
              if (code === vfio.PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS) {
                for (const r of g.requests) {
                  const iova = r.address & ~(PAGE - 1n);
                  await c.vfio
                    .mapGuestPages({
                      containerId,
                      hpasid: g.hpasid,
                      generation: 0,
                      iova,
                      gpa: (iova - GUEST_VA_BASE) & (GUEST_RAM.size - 1n),
                      size: PAGE,
                      access: { read: true, write: true, execute: false, privileged: false },
                    })
                    .catch((err: unknown) => {
                      if (!isDomainError(err, "IOVA_ALREADY_MAPPED")) throw err;
                    });
                }
              }
              await c.vfio.sendPageResponse({ containerId, faultGroupId: g.faultGroupId, code });
            },
          );
          answering.add(answer);
          void answer.then(() => answering.delete(answer));
        }
        return; // the container closed
      } catch (err) {
        if (ac.signal.aborted || isDomainError(err, "CONTAINER_NOT_FOUND")) return;
        await sleep(200);
      }
    }
  })();
  return {
    async stop() {
      ac.abort();
      await loop;
      await Promise.all(answering);
    },
  };
}

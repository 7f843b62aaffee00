import { isDeepStrictEqual } from "node:util";
import { Code, isDomainError } from "@ioasid/errors";
import { createClient, createVfioSession, vfioCapabilityMetadata, type CallOptions, type PromiseClient, type VfioSession } from "@ioasid/grpc-kit";
import { core, events, iommu, kvm, vdcm, vfio } from "@ioasid/proto";
import { eventually, expectEqual, expectRefused, expectRefusedUnchanged, expectThat, show, type Clause } from "../clause.js";
import type { Harness, KitTier } from "../harness.js";
import type { RoleSuite } from "../suite.js";
import { eventOf, holdersOf, stateOf } from "./core-steps.js";

type VfioClient = PromiseClient<typeof vfio.VfioServiceService>;
type IommuClient = PromiseClient<typeof iommu.IommuServiceService>;
type VdcmClient = PromiseClient<typeof vdcm.VdcmServiceService>;
type KvmClient = PromiseClient<typeof kvm.KvmServiceService>;

/** What the VFIO clauses run with: the target, and clients of our roles around it (the kit plays the VMM, the guest and the devices). */
export interface VfioCtx {
  readonly h: Harness;
  /** The kit as the VMMs of its VMs: a capability store that holds what each OpenContainer answered. */
  readonly vfio: VfioSession;
  /** A VMM that holds no capability (a client without a store): it sends one only when a clause gives it. */
  readonly stranger: VfioClient;
  readonly iommu: IommuClient;
  readonly vdcm: VdcmClient;
  readonly kvm: KvmClient;
  /** What the clause running now opened, for its cleanup. */
  readonly opened: Vm[];
  readonly tiers: KitTier[];
  readonly watches: Watch[];
  /** The highest container id the target handed out in this run (ids are never reused, even across a restart). */
  maxContainerId: number;
  /** IOMMU group of the next device the kit registers. */
  nextGroup: number;
}

const { EventType, Priority } = events;
const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);

/**
 * Guest physical memory the kit's VMs map (stage 2: GPA → the host memory the target gave the VM,
 * {@link hpaOf}), and the guest virtual addresses they fault on. Each VM asks for GUEST_MEMORY bytes
 * of host memory at open (not the target's default: the kit needs little of its pool).
 */
const GPA = 0x1000_0000n;
const STAGE2_SIZE = 0x10_0000n;
const GUEST_MEMORY = 0x100_0000n;
const GVA = 0x7f00_0000_0000n;
const PAGE = 0x1000n;
const RW = { read: true, write: true };
/** A host PASID the core never hands out in a conformance run (it allocates lowest first). */
const NEVER_ALLOCATED = 0xffff0;
/** A container id no target hands out in a conformance run. */
const NO_CONTAINER = 0x7fff_fff0;

const pci = (deviceId: string): vfio.DeviceRef => ({ ref: { $case: "deviceId", value: deviceId } });
const mdevRef = (uuid: string): vfio.DeviceRef => ({ ref: { $case: "mdevUuid", value: uuid } });

// ---------------------------------------------------------------------------------------------
// The kit as the VMM: sessions, watchers, containers

/** A Session stream the kit holds as the VMM (cancel = the VMM's connection dropping, as when it is killed). */
interface Session {
  readonly messages: vfio.SessionResponse[];
  /** Settles when the stream ends: undefined when it completed OK, else its error. */
  readonly ended: Promise<unknown>;
  cancel(): void;
}

/** Opens the container's Session stream; resolves once the first message arrived, rejects with the stream's error. */
function attach(c: VfioCtx, containerId: number): Promise<Session> {
  const ac = new AbortController();
  const messages: vfio.SessionResponse[] = [];
  let first: (() => void) | undefined;
  const attached = new Promise<void>((resolve) => (first = resolve));
  const ended = (async () => {
    try {
      for await (const m of c.vfio.session({ containerId }, { signal: ac.signal })) {
        messages.push(m);
        first?.();
      }
      return undefined;
    } catch (err) {
      return err;
    }
  })();
  const session: Session = { messages, ended, cancel: () => ac.abort() };
  // Ended before its first message: the attachment was refused (or the stream completed empty).
  return Promise.race([
    attached.then(() => session),
    ended.then((err) => {
      if (messages.length > 0) return session;
      throw err ?? new Error("the Session stream ended without a message");
    }),
  ]);
}

/** A VM the kit plays: its container (and the Session it holds), and its KVM VM when it has one. */
interface Vm {
  readonly token: bigint;
  readonly containerId: number;
  readonly setId: number;
  /** The host memory the target gave the container (OpenContainerResponse.guest_memory). */
  readonly guestMemory: readonly vfio.HostRange[];
  readonly vmId: number | undefined;
  session: Session | undefined;
}

/**
 * Opens a container for a fresh (or given) MM token, as a VMM does: with its KVM VM created first
 * when `kvm` (KVM registers by the token, pending until the set exists), then holding its Session.
 */
async function openVm(c: VfioCtx, opts: { token?: bigint; kvm?: boolean; quota?: number; session?: boolean; graceMs?: number } = {}): Promise<Vm> {
  const token = opts.token ?? c.h.uniqueToken();
  const vmId =
    opts.kvm === true ? (await c.kvm.createVm(P(kvm.CreateVmRequest, { mmToken: token, vcpuCount: 1, vmName: c.h.uniqueName("vm") }))).vm!.vmId : undefined;
  const opened = await c.vfio.openContainer(
    P(vfio.OpenContainerRequest, {
      mmToken: token,
      quota: opts.quota ?? 8,
      vmName: c.h.uniqueName("vm"),
      sessionGraceMs: opts.graceMs ?? 60_000,
      guestMemorySize: GUEST_MEMORY,
    }),
  );
  c.maxContainerId = Math.max(c.maxContainerId, opened.containerId);
  const vm: Vm = { token, containerId: opened.containerId, setId: opened.setId, guestMemory: opened.guestMemory, vmId, session: undefined };
  c.opened.push(vm);
  if (opts.session !== false) vm.session = await attach(c, vm.containerId);
  return vm;
}

/**
 * Where the VM's guest RAM is in host memory: the start of what the target gave its container —
 * MapDma maps nothing else (vfio.proto MapDma).
 */
function hpaOf(vm: Vm): bigint {
  const first = vm.guestMemory[0];
  if (first === undefined) throw new Error(`the target gave container ${vm.containerId} no host memory (OpenContainerResponse.guest_memory is empty)`);
  return first.paddr;
}

/** The container as QueryState shows it, or undefined once it is gone (NOT_FOUND CONTAINER_NOT_FOUND). */
async function containerOf(c: VfioCtx, containerId: number): Promise<vfio.Container | undefined> {
  try {
    return (await c.vfio.queryState({ containerId })).containers[0];
  } catch (err) {
    if (isDomainError(err, "CONTAINER_NOT_FOUND")) return undefined;
    throw err;
  }
}

/** A container's guest PASIDs as `hpasid:gpasid[devices]` (`!` when free pending). */
async function pasidsOf(c: VfioCtx, containerId: number): Promise<string[] | undefined> {
  const ctr = await containerOf(c, containerId);
  return ctr?.pasids.map((p) => `${p.hpasid}:${p.gpasid}[${p.boundDevices.map(refName).join(",")}]${p.freePending ? "!" : ""}`);
}

function refName(d: vfio.DeviceRef | undefined): string {
  return d?.ref === undefined ? "?" : d.ref.value;
}

/** A fault watcher the kit holds as the VMM. */
interface Watch {
  readonly items: NonNullable<vfio.WatchFaultsResponse["item"]>[];
  /** Settles when the stream ends: undefined when it completed OK, else its error. */
  readonly ended: Promise<unknown>;
  stop(): void;
  groups(): vfio.FaultGroup[];
  answered(): vfio.FaultAnswer[];
}

/** Opens WatchFaults on the container (the stream is lazy: it is attached once the target has the request). */
function watch(c: VfioCtx, containerId: number): Watch {
  const ac = new AbortController();
  const items: NonNullable<vfio.WatchFaultsResponse["item"]>[] = [];
  const ended = (async () => {
    try {
      for await (const m of c.vfio.watchFaults({ containerId }, { signal: ac.signal })) if (m.item !== undefined) items.push(m.item);
      return undefined;
    } catch (err) {
      return err;
    }
  })();
  const w: Watch = {
    items,
    ended,
    stop: () => ac.abort(),
    groups: () => items.flatMap((i) => (i.$case === "group" ? [i.value] : [])),
    answered: () => items.flatMap((i) => (i.$case === "answered" ? [i.value] : [])),
  };
  c.watches.push(w);
  return w;
}

/** WatchFaults opened and attached (QueryState says so). */
async function watching(c: VfioCtx, containerId: number): Promise<Watch> {
  const w = watch(c, containerId);
  await eventually(
    () => containerOf(c, containerId),
    (ctr) => ctr?.faultWatcherAttached === true,
    "QueryState to show the fault watcher attached",
  );
  return w;
}

// ---------------------------------------------------------------------------------------------
// The kit as the operator and the devices

/** A PCI function registered at the IOMMU (PRI-capable unless said otherwise), under a fresh id. */
async function pciDevice(c: VfioCtx, opts: { pri?: boolean } = {}): Promise<string> {
  const deviceId = c.h.uniqueName("pf");
  await c.iommu.registerDevice(
    P(iommu.RegisterDeviceRequest, {
      deviceId,
      maxPasids: 1 << 20,
      priCapable: opts.pri ?? true,
      function: iommu.DeviceFunction.DEVICE_FUNCTION_PF,
      iommuGroup: c.nextGroup++,
    }),
  );
  return deviceId;
}

/** An mdev with one dedicated work queue, on a fresh device registered at VDCM and at the IOMMU. */
async function mdevDevice(c: VfioCtx): Promise<{ uuid: string; parent: string }> {
  const parent = await pciDevice(c);
  await c.vdcm.registerDevice(P(vdcm.RegisterDeviceRequest, { deviceId: parent, wqs: [{ wqId: 0, mode: vdcm.WqMode.WQ_MODE_DEDICATED, size: 8 }] }));
  const uuid = c.h.uniqueName("mdev");
  await c.vdcm.createMdev(P(vdcm.CreateMdevRequest, { parentDeviceId: parent, mdevUuid: uuid, wqIds: [0] }));
  return { uuid, parent };
}

async function assign(c: VfioCtx, vm: Vm, device: vfio.DeviceRef): Promise<void> {
  await c.vfio.assignDevice(P(vfio.AssignDeviceRequest, { containerId: vm.containerId, device }));
}

async function alloc(c: VfioCtx, vm: Vm): Promise<{ hpasid: number; generation: number }> {
  return c.vfio.allocPasid({ containerId: vm.containerId });
}

function bind(c: VfioCtx, vm: Vm, device: vfio.DeviceRef, p: { hpasid: number; generation: number }, gpasid: number): Promise<vfio.BindGuestPasidResponse> {
  return c.vfio.bindGuestPasid(
    P(vfio.BindGuestPasidRequest, { containerId: vm.containerId, device, hpasid: p.hpasid, generation: p.generation, gpasid, guestPgtable: 0x5000n }),
  );
}

function unbind(c: VfioCtx, vm: Vm, device: vfio.DeviceRef, p: { hpasid: number; generation: number }, gpasid = 0): Promise<vfio.UnbindGuestPasidResponse> {
  return c.vfio.unbindGuestPasid(P(vfio.UnbindGuestPasidRequest, { containerId: vm.containerId, device, hpasid: p.hpasid, generation: p.generation, gpasid }));
}

/** One DMA read of a device (its PASID, or its RID when `pasid` is 0). */
function dma(c: VfioCtx, deviceId: string, pasid: number, address: bigint): Promise<iommu.TranslateResponse> {
  return c.iommu.translate(P(iommu.TranslateRequest, { deviceId, pasid, withoutPasid: pasid === 0, address, access: { read: true } }));
}

/** A device's PASID entries at the IOMMU as `pasid:gpasid@set` (`rid@domain` for its RID entry). */
async function iommuEntries(c: VfioCtx, deviceId: string): Promise<string[]> {
  const s = await c.iommu.queryState(P(iommu.QueryStateRequest, { deviceIds: [deviceId] }));
  const d = s.devices.find((x) => x.deviceId === deviceId);
  return (d?.pasidEntries ?? []).map((e) => (e.withoutPasid ? `rid@${e.domainId}` : `${e.pasid}:${e.gpasid}@${e.setId}`)).sort();
}

/** The stage-2 domain attached to a device's RID, if any. */
async function ridDomain(c: VfioCtx, deviceId: string): Promise<number | undefined> {
  const s = await c.iommu.queryState(P(iommu.QueryStateRequest, { deviceIds: [deviceId] }));
  return s.devices.find((x) => x.deviceId === deviceId)?.pasidEntries.find((e) => e.withoutPasid)?.domainId;
}

/** Whether the IOMMU still has the domain. */
async function domainExists(c: VfioCtx, domainId: number): Promise<boolean> {
  return (await c.iommu.queryState(P(iommu.QueryStateRequest, {}))).domains.some((d) => d.domainId === domainId);
}

/** The mdev at VDCM: its set (0 when unassigned) and its parent's device PASID entries as `hpasid:gpasid`. */
async function vdcmView(c: VfioCtx, m: { uuid: string; parent: string }): Promise<{ setId: number; entries: string[] }> {
  const s = await c.vdcm.queryState({ deviceIds: [m.parent] });
  return {
    setId: s.mdevs.find((x) => x.mdevUuid === m.uuid)?.setId ?? -1,
    entries: (s.devices.find((d) => d.deviceId === m.parent)?.pasidEntries ?? []).map((e) => `${e.hpasid}:${e.gpasid}`),
  };
}

/** The KVM VM's VMCS table as `gpasid->hpasid`. */
async function kvmTable(c: VfioCtx, vm: Vm): Promise<string[]> {
  if (vm.vmId === undefined) return [];
  return (await c.kvm.queryState({ vmId: vm.vmId })).vms[0]!.translations.map((t) => `${t.gpasid}->${t.hpasid}`);
}

/** Whether the core still has the set. */
async function setExists(c: VfioCtx, setId: number): Promise<boolean> {
  return (await c.h.core.listSets({})).sets.some((s) => s.setId === setId);
}

/** Whether the IOASID of that generation was reclaimed. */
async function reclaimed(c: VfioCtx, p: { hpasid: number; generation: number }): Promise<boolean> {
  const s = await stateOf(c.h, p.hpasid);
  return s === undefined || s.generation !== p.generation;
}

/**
 * Everything a refused call naming these VMs and devices could change: the containers as QueryState
 * shows them, the core's IOASIDs of their sets, and the devices' PASID entries at the IOMMU.
 */
async function world(c: VfioCtx, vms: readonly Vm[], deviceIds: readonly string[] = []): Promise<unknown> {
  const containers = [];
  const ioasids = [];
  for (const vm of vms) {
    containers.push(await containerOf(c, vm.containerId));
    ioasids.push((await c.h.core.listIoasids({ setId: vm.setId }).catch(() => ({ ioasids: [] }))).ioasids);
  }
  const devices = [];
  for (const d of deviceIds) devices.push(await iommuEntries(c, d));
  return { containers, ioasids, devices };
}

// ---------------------------------------------------------------------------------------------
// Clauses

/** A clause whose VMs, tiers and watchers are closed after it, pass or fail (each clause stands alone). */
function clause(def: Clause<VfioCtx>): Clause<VfioCtx> {
  return {
    ...def,
    async run(c) {
      try {
        await def.run(c);
      } finally {
        await cleanup(c);
      }
    },
  };
}

async function cleanup(c: VfioCtx): Promise<void> {
  for (const w of c.watches.splice(0)) w.stop();
  for (const t of c.tiers.splice(0)) await t.close().catch(() => undefined);
  for (const vm of c.opened.splice(0)) {
    await c.vfio.closeContainer({ containerId: vm.containerId }).catch(() => undefined);
    vm.session?.cancel();
    if (vm.vmId !== undefined) await c.kvm.destroyVm({ vmId: vm.vmId }).catch(() => undefined);
  }
}

/** The kit as another tier of the VM's chain, registered by its token before its set exists (no replay: §3). */
async function tierFor(c: VfioCtx, priority: events.Priority, token: bigint): Promise<KitTier> {
  const t = await c.h.playTier(priority, { mmToken: token });
  c.tiers.push(t);
  return t;
}

/** A VM with a PCI function assigned, its stage 2 mapped, and one guest PASID bound on the function (gpasid 77). */
async function boundGuest(
  c: VfioCtx,
  opts: { pri?: boolean; kvm?: boolean } = {},
): Promise<{ vm: Vm; device: string; p: { hpasid: number; generation: number }; gpasid: number }> {
  const vm = await openVm(c, { kvm: opts.kvm ?? false });
  const device = await pciDevice(c, { pri: opts.pri ?? true });
  await assign(c, vm, pci(device));
  await c.vfio.mapDma(P(vfio.MapDmaRequest, { containerId: vm.containerId, iova: GPA, paddr: hpaOf(vm), size: STAGE2_SIZE, access: RW }));
  const p = await alloc(c, vm);
  await bind(c, vm, pci(device), p, 77);
  return { vm, device, p, gpasid: 77 };
}

/** Waits until the kit's tier has received an event of `type` for `ioasid`. */
async function reachedTier(tier: KitTier, type: events.EventType, ioasid: number): Promise<void> {
  await eventually(
    async () => tier.received.some((d) => d.event.type === type && d.event.ioasid === ioasid),
    (x) => x,
    `the core to emit ${events.eventTypeToJSON(type)} for IOASID ${ioasid} (the kit's tier to receive it)`,
  );
}

/** A bound guest with a fault watcher, and one complete fault group its device raised (a first-stage miss). */
async function faultingGuest(c: VfioCtx) {
  const g = await boundGuest(c);
  const w = await watching(c, g.vm.containerId);
  const t = await dma(c, g.device, g.p.hpasid, GVA);
  expectEqual(
    { outcome: t.outcome, complete: t.groupComplete },
    { outcome: iommu.TranslateOutcome.TRANSLATE_OUTCOME_PAGE_REQUEST, complete: true },
    "the device's DMA at an address the guest has not mapped (a page request)",
  );
  const group = await eventually(
    async () => w.groups().find((x) => x.faultGroupId === t.faultGroupId),
    (x) => x !== undefined,
    `fault group ${t.faultGroupId} relayed on WatchFaults`,
  );
  return { ...g, w, group: group! };
}

/** The first message of a server stream (leaving the loop cancels the call); rejects with the stream's error. */
async function firstMessage(stream: AsyncIterable<unknown>): Promise<unknown> {
  for await (const m of stream) return m;
  return undefined;
}

/**
 * Every VfioService call that names a container — all but OpenContainer and QueryState — aimed at
 * `g`'s container and its objects (its device, its bound PASID, its relayed fault group, its stage
 * 2), made by a VMM that holds no capability for it ({@link VfioCtx.stranger}) with `options`.
 * `spare` is a device nobody was given (for AssignDevice).
 */
function callsNaming(
  c: VfioCtx,
  g: Awaited<ReturnType<typeof faultingGuest>>,
  spare: string,
): ReadonlyArray<readonly [string, (options: CallOptions) => Promise<unknown>]> {
  const containerId = g.vm.containerId;
  const s = c.stranger;
  // A stream the target accepted would wait for messages that never come: a short deadline ends it.
  const stream = (o: CallOptions): CallOptions => ({ ...o, deadlineMs: 3000 });
  return [
    ["Session", (o) => firstMessage(s.session({ containerId }, stream(o)))],
    ["CloseContainer", (o) => s.closeContainer({ containerId }, o)],
    ["AssignDevice", (o) => s.assignDevice(P(vfio.AssignDeviceRequest, { containerId, device: pci(spare) }), o)],
    ["UnassignDevice", (o) => s.unassignDevice(P(vfio.UnassignDeviceRequest, { containerId, device: pci(g.device) }), o)],
    ["AllocPasid", (o) => s.allocPasid({ containerId }, o)],
    ["FreePasid", (o) => s.freePasid({ containerId, hpasid: g.p.hpasid, generation: g.p.generation }, o)],
    [
      "BindGuestPasid",
      (o) =>
        s.bindGuestPasid(
          P(vfio.BindGuestPasidRequest, {
            containerId,
            device: pci(g.device),
            hpasid: g.p.hpasid,
            generation: g.p.generation,
            gpasid: 79,
            guestPgtable: 0x6000n,
          }),
          o,
        ),
    ],
    [
      "UnbindGuestPasid",
      (o) =>
        s.unbindGuestPasid(
          P(vfio.UnbindGuestPasidRequest, { containerId, device: pci(g.device), hpasid: g.p.hpasid, generation: g.p.generation, gpasid: g.gpasid }),
          o,
        ),
    ],
    ["WatchFaults", (o) => firstMessage(s.watchFaults({ containerId }, stream(o)))],
    [
      "SendPageResponse",
      (o) => s.sendPageResponse({ containerId, faultGroupId: g.group.faultGroupId, code: vfio.PageResponseCode.PAGE_RESPONSE_CODE_INVALID }, o),
    ],
    ["MapDma", (o) => s.mapDma(P(vfio.MapDmaRequest, { containerId, iova: GPA + STAGE2_SIZE, paddr: hpaOf(g.vm) + STAGE2_SIZE, size: PAGE, access: RW }), o)],
    ["UnmapDma", (o) => s.unmapDma(P(vfio.UnmapDmaRequest, { containerId, iova: GPA, size: STAGE2_SIZE }), o)],
    [
      "MapGuestPages",
      (o) =>
        s.mapGuestPages(
          P(vfio.MapGuestPagesRequest, { containerId, hpasid: g.p.hpasid, generation: g.p.generation, iova: GVA, gpa: GPA, size: PAGE, access: RW }),
          o,
        ),
    ],
    [
      "UnmapGuestPages",
      (o) => s.unmapGuestPages(P(vfio.UnmapGuestPagesRequest, { containerId, hpasid: g.p.hpasid, generation: g.p.generation, iova: GVA, size: PAGE }), o),
    ],
  ];
}

/**
 * Everything of a faulting guest a refused call could change: VFIO (its watcher too), the core, the
 * IOMMU (entries, its stage 2, the group), what was relayed.
 */
async function guestWorld(c: VfioCtx, g: Awaited<ReturnType<typeof faultingGuest>>, others: readonly Vm[], spare: string): Promise<unknown> {
  const stage2 = await ridDomain(c, g.device);
  const s = await c.iommu.queryState(P(iommu.QueryStateRequest, { deviceIds: [g.device, spare] }));
  return {
    w: await world(c, [g.vm, ...others], [g.device, spare]),
    group: s.faultGroups.find((x) => x.faultGroupId === g.group.faultGroupId)?.state,
    // The guest's stage 2 only: other clauses' domains are still being freed in the background.
    stage2: s.domains.find((d) => d.domainId === stage2)?.mappings.map((m) => `${m.iova}+${m.size}`),
    relayed: g.w.items.length,
  };
}

const clauses: Clause<VfioCtx>[] = [
  // ----- RPCs: containers and sessions
  clause({
    id: "vfio.rpc.open-container",
    statement: "OpenContainer creates the VM's IOASID set (token type MM, the VM's MM token, the quota) and the container waits for its session",
    source: "DESIGN §5 VFIO; vfio.proto OpenContainer",
    async run(c) {
      const vm = await openVm(c, { quota: 5, session: false });
      const set = (await c.h.core.getSet(P(core.GetSetRequest, { setId: vm.setId }))).set!;
      expectEqual(
        { tokenType: set.tokenType, token: set.token, quota: set.quota, inUse: set.inUse },
        { tokenType: events.TokenType.TOKEN_TYPE_MM, token: vm.token, quota: 5, inUse: 0 },
        "the core's set of the container",
      );
      const ctr = (await containerOf(c, vm.containerId))!;
      expectEqual(
        { setId: ctr.setId, mmToken: ctr.mmToken, quota: ctr.quota, state: ctr.state, deadline: ctr.sessionDeadline !== undefined },
        { setId: vm.setId, mmToken: vm.token, quota: 5, state: vfio.ContainerState.CONTAINER_STATE_AWAITING_SESSION, deadline: true },
        "QueryState of the new container",
      );
    },
  }),
  clause({
    id: "vfio.rpc.open-container.refused",
    statement:
      "OpenContainer for an MM token that has a set is ALREADY_EXISTS TOKEN_IN_USE, with no token INVALID_ARGUMENT INVALID_FIELD, with a quota beyond what is left RESOURCE_EXHAUSTED CAPACITY_EXHAUSTED; none changes anything",
    source: "vfio.proto OpenContainer; DESIGN §3 (sets, quotas), §8",
    async run(c) {
      const vm = await openVm(c, { session: false });
      const fresh = c.h.uniqueToken();
      const tokens = [vm.token, fresh];
      const seen = async () => ({
        sets: (await c.h.core.listSets({})).sets.filter((s) => tokens.includes(s.token)).map((s) => s.setId),
        containers: (await c.vfio.queryState({ containerId: 0 })).containers.filter((x) => tokens.includes(x.mmToken)).map((x) => x.containerId),
      });
      const open = (mmToken: bigint, quota: number) => c.vfio.openContainer(P(vfio.OpenContainerRequest, { mmToken, quota, vmName: "refused" }));
      await expectRefusedUnchanged(seen, () => open(vm.token, 4), Code.ALREADY_EXISTS, "TOKEN_IN_USE", "a second container for the token");
      await expectRefusedUnchanged(seen, () => open(0n, 4), Code.INVALID_ARGUMENT, "INVALID_FIELD", "no MM token");
      // The namespace's capacity less one: never available while the kit's own sets hold quotas.
      await expectRefusedUnchanged(seen, () => open(fresh, (1 << 20) - 1), Code.RESOURCE_EXHAUSTED, "CAPACITY_EXHAUSTED", "a quota beyond what is left");
    },
  }),
  clause({
    id: "vfio.rpc.session",
    statement:
      "Session's first message confirms the attachment and the container turns ACTIVE; a second Session is ALREADY_EXISTS SESSION_ALREADY_ATTACHED, one on no container NOT_FOUND CONTAINER_NOT_FOUND; neither changes anything",
    source: "vfio.proto Session; DESIGN §5 VFIO (a container lives as long as the VMM's session)",
    async run(c) {
      const vm = await openVm(c, { session: false });
      vm.session = await attach(c, vm.containerId);
      expectEqual(vm.session.messages[0]?.event, { $case: "attached", value: { containerId: vm.containerId, setId: vm.setId } }, "the Session's first message");
      const ctr = (await containerOf(c, vm.containerId))!;
      expectEqual(
        { state: ctr.state, deadline: ctr.sessionDeadline },
        { state: vfio.ContainerState.CONTAINER_STATE_ACTIVE, deadline: undefined },
        "the container",
      );
      await expectRefusedUnchanged(
        () => world(c, [vm]),
        () => attach(c, vm.containerId),
        Code.ALREADY_EXISTS,
        "SESSION_ALREADY_ATTACHED",
        "a second Session",
      );
      await expectRefusedUnchanged(
        () => world(c, [vm]),
        () => attach(c, NO_CONTAINER),
        Code.NOT_FOUND,
        "CONTAINER_NOT_FOUND",
        "a Session on no container",
      );
    },
  }),
  clause({
    id: "vfio.rpc.close-container",
    statement:
      "CloseContainer frees every IOASID of the set and ends the Session with `closed` CLOSED and OK; the set is reclaimed, the device detached, the container gone; closing again is NOT_FOUND CONTAINER_NOT_FOUND",
    source: "vfio.proto CloseContainer, Session; DESIGN §5 VFIO",
    async run(c) {
      const vm = await openVm(c);
      const device = await pciDevice(c);
      await assign(c, vm, pci(device));
      const a = await alloc(c, vm);
      const b = await alloc(c, vm);
      const res = await c.vfio.closeContainer({ containerId: vm.containerId });
      expectEqual({ freed: res.freedPasids, unassigned: res.unassignedDevices }, { freed: 2, unassigned: 1 }, "CloseContainer's answer");
      const ended = await vm.session!.ended;
      expectEqual(
        { error: ended === undefined ? undefined : show(ended), last: vm.session!.messages.at(-1)?.event },
        { error: undefined, last: { $case: "closed", value: { reason: vfio.CloseReason.CLOSE_REASON_CLOSED } } },
        "the Session stream's end",
      );
      await eventually(
        async () => ({ set: await setExists(c, vm.setId), a: await reclaimed(c, a), b: await reclaimed(c, b), ctr: await containerOf(c, vm.containerId) }),
        (x) => !x.set && x.a && x.b && x.ctr === undefined,
        "the set destroyed, both IOASIDs reclaimed and the container gone",
      );
      await eventually(
        () => iommuEntries(c, device),
        (e) => e.length === 0,
        "the device's RID detached at the IOMMU",
      );
      await expectRefused(c.vfio.closeContainer({ containerId: vm.containerId }), Code.NOT_FOUND, "CONTAINER_NOT_FOUND", "closing it again");
    },
  }),
  // ----- RPCs: devices
  clause({
    id: "vfio.rpc.assign-device",
    statement:
      "AssignDevice attaches a physical device's RID to the VM's stage-2 domain and gives an mdev to the VM's set at VDCM (which registers on the set); QueryState lists both",
    source: "vfio.proto AssignDevice; DESIGN §5 VFIO",
    async run(c) {
      const vm = await openVm(c);
      const m = await mdevDevice(c);
      const device = await pciDevice(c);
      const got = await c.vfio.assignDevice(P(vfio.AssignDeviceRequest, { containerId: vm.containerId, device: mdevRef(m.uuid) }));
      expectEqual(
        { device: got.assigned?.device, parent: got.assigned?.parentDeviceId },
        { device: mdevRef(m.uuid), parent: m.parent },
        "AssignDevice's answer (mdev)",
      );
      await assign(c, vm, pci(device));
      const domain = await ridDomain(c, device);
      expectThat(domain !== undefined, "the device's RID attached to a domain at the IOMMU", await iommuEntries(c, device));
      const v = await c.vdcm.queryState({ deviceIds: [m.parent] });
      expectEqual(
        { mdevSet: v.mdevs.find((x) => x.mdevUuid === m.uuid)?.setId, registered: v.registeredSetIds.includes(vm.setId) },
        { mdevSet: vm.setId, registered: true },
        "the mdev at VDCM",
      );
      const ctr = (await containerOf(c, vm.containerId))!;
      expectEqual(
        ctr.devices.map((d) => ({ device: d.device, parent: d.parentDeviceId })),
        [
          { device: mdevRef(m.uuid), parent: m.parent },
          { device: pci(device), parent: "" },
        ],
        "QueryState's devices",
      );
    },
  }),
  clause({
    id: "vfio.rpc.assign-device.refused",
    statement:
      "AssignDevice of an unknown device is NOT_FOUND DEVICE_NOT_FOUND / MDEV_NOT_FOUND, of one already assigned ALREADY_EXISTS DEVICE_ALREADY_ASSIGNED, of a first mdev after PASIDs FAILED_PRECONDITION SET_NOT_EMPTY; none changes anything",
    source: "vfio.proto AssignDevice; DESIGN §3 (no replay), §8",
    async run(c) {
      const vm = await openVm(c);
      const device = await pciDevice(c);
      await assign(c, vm, pci(device));
      const m = await mdevDevice(c);
      const assignTo = (d: vfio.DeviceRef) => () => c.vfio.assignDevice(P(vfio.AssignDeviceRequest, { containerId: vm.containerId, device: d }));
      const unknownDevice = c.h.uniqueName("nodev");
      // Not in the snapshot: the IOMMU's domain list. Our VFIO creates the VM's stage-2 domain on first
      // need, before the IOMMU refuses an unknown device, and keeps it (DESIGN §8 says a refused call
      // creates nothing, not even lazily): reported to the lead; here the device is assigned first.
      const snapshot = async () => ({ w: await world(c, [vm], [device]), mdev: await vdcmView(c, m) });
      await expectRefusedUnchanged(snapshot, assignTo(pci(unknownDevice)), Code.NOT_FOUND, "DEVICE_NOT_FOUND", "an unregistered device");
      await expectRefusedUnchanged(snapshot, assignTo(mdevRef(c.h.uniqueName("nomdev"))), Code.NOT_FOUND, "MDEV_NOT_FOUND", "an unknown mdev");
      await expectRefusedUnchanged(snapshot, assignTo(pci(device)), Code.ALREADY_EXISTS, "DEVICE_ALREADY_ASSIGNED", "the device again");
      await alloc(c, vm);
      await expectRefusedUnchanged(snapshot, assignTo(mdevRef(m.uuid)), Code.FAILED_PRECONDITION, "SET_NOT_EMPTY", "a first mdev after a PASID");
    },
  }),
  clause({
    id: "vfio.rpc.unassign-device",
    statement:
      "UnassignDevice unbinds the device's guest PASIDs first (the last unbind detaches the SPID), detaches it and hands an mdev back to VDCM; of a device not assigned it is FAILED_PRECONDITION DEVICE_NOT_ASSIGNED and changes nothing",
    source: "vfio.proto UnassignDevice",
    async run(c) {
      const g = await boundGuest(c);
      const m = await mdevDevice(c);
      const other = await openVm(c);
      await assign(c, other, mdevRef(m.uuid));
      const elsewhere = await pciDevice(c);
      await expectRefusedUnchanged(
        () => world(c, [g.vm], [g.device, elsewhere]),
        () => c.vfio.unassignDevice(P(vfio.UnassignDeviceRequest, { containerId: g.vm.containerId, device: pci(elsewhere) })),
        Code.FAILED_PRECONDITION,
        "DEVICE_NOT_ASSIGNED",
        "a registered device not assigned to the container",
      );
      const res = await c.vfio.unassignDevice(P(vfio.UnassignDeviceRequest, { containerId: g.vm.containerId, device: pci(g.device) }));
      expectEqual(res.unbound, 1, "binds unbound by UnassignDevice");
      expectEqual(await iommuEntries(c, g.device), [], "the device's entries at the IOMMU after UnassignDevice");
      const info = (await c.h.core.describe({ ioasid: g.p.hpasid })).info!;
      expectEqual(info.spid, 0, "the IOASID's SPID after its last device unbind");
      expectEqual((await containerOf(c, g.vm.containerId))!.devices, [], "QueryState's devices after UnassignDevice");
      await c.vfio.unassignDevice(P(vfio.UnassignDeviceRequest, { containerId: other.containerId, device: mdevRef(m.uuid) }));
      expectEqual((await vdcmView(c, m)).setId, 0, "the mdev's set at VDCM after UnassignDevice");
    },
  }),
  // ----- RPCs: guest PASIDs (virtual command) and binds
  clause({
    id: "vfio.rpc.alloc-pasid",
    statement:
      "AllocPasid allocates an IOASID in the container's set and returns it with its generation; beyond the set's quota it is RESOURCE_EXHAUSTED SET_QUOTA_EXCEEDED and changes nothing",
    source: "vfio.proto AllocPasid; DESIGN §3 (quota)",
    async run(c) {
      const vm = await openVm(c, { quota: 2 });
      // In IOASID order, as both lists come: the core may hand out a lower IOASID second (one a
      // background reclaim of an earlier clause returned meanwhile).
      const both = [await alloc(c, vm), await alloc(c, vm)].sort((x, y) => x.hpasid - y.hpasid);
      const ioasids = (await c.h.core.listIoasids({ setId: vm.setId })).ioasids;
      expectEqual(
        ioasids.map((i) => ({ ioasid: i.ioasid, generation: i.generation, state: i.state })),
        both.map((x) => ({ ioasid: x.hpasid, generation: x.generation, state: core.IoasidState.IOASID_STATE_ACTIVE })),
        "the core's IOASIDs of the set",
      );
      expectEqual((await pasidsOf(c, vm.containerId))?.sort(), both.map((x) => `${x.hpasid}:0[]`).sort(), "QueryState's PASIDs");
      await expectRefusedUnchanged(
        () => world(c, [vm]),
        () => alloc(c, vm),
        Code.RESOURCE_EXHAUSTED,
        "SET_QUOTA_EXCEEDED",
        "an allocation beyond the quota",
      );
      await expectRefused(c.vfio.allocPasid({ containerId: NO_CONTAINER }), Code.NOT_FOUND, "CONTAINER_NOT_FOUND", "AllocPasid on no container");
    },
  }),
  clause({
    id: "vfio.rpc.free-pasid",
    statement:
      "FreePasid reclaims an IOASID nothing else holds at once; one still held becomes FREE_PENDING and a second free changes nothing; a stale generation is FAILED_PRECONDITION STALE_GENERATION, a reclaimed IOASID NOT_FOUND IOASID_NOT_FOUND, neither changing anything",
    source: "vfio.proto FreePasid; DESIGN §3 (free always succeeds, is idempotent)",
    async run(c) {
      const vm = await openVm(c);
      const a = await alloc(c, vm);
      const b = await alloc(c, vm);
      const free = (x: { hpasid: number }, generation: number) => c.vfio.freePasid({ containerId: vm.containerId, hpasid: x.hpasid, generation });
      expectEqual(await free(a, a.generation), { reclaimed: true, alreadyFreePending: false }, "FreePasid of an IOASID nothing else holds");
      await expectRefusedUnchanged(
        () => world(c, [vm]),
        () => free(b, b.generation + 1),
        Code.FAILED_PRECONDITION,
        "STALE_GENERATION",
        "a stale generation",
      );
      // The kit holds a reference, as a role would: the free leaves it FREE_PENDING.
      const holder = { role: "conform", instance: c.h.uniqueName("holder"), purpose: "free-pending" };
      await c.h.core.get(P(core.GetRequest, { setId: vm.setId, ioasid: b.hpasid, holder }));
      try {
        expectEqual(await free(b, 0), { reclaimed: false, alreadyFreePending: false }, "FreePasid of an IOASID another holder references");
        expectEqual(await pasidsOf(c, vm.containerId), [`${b.hpasid}:0[]!`], "QueryState's PASIDs after the free");
        expectEqual(await free(b, 0), { reclaimed: false, alreadyFreePending: true }, "a second FreePasid");
        expectEqual((await stateOf(c.h, b.hpasid))?.state, core.IoasidState.IOASID_STATE_FREE_PENDING, "the IOASID's state after the second free");
      } finally {
        await c.h.core.put(P(core.PutRequest, { setId: vm.setId, ioasid: b.hpasid, holder }));
      }
      await expectRefusedUnchanged(
        () => world(c, [vm]),
        () => free(b, 0),
        Code.NOT_FOUND,
        "IOASID_NOT_FOUND",
        "a reclaimed IOASID",
      );
    },
  }),
  clause({
    id: "vfio.rpc.bind-guest-pasid",
    statement:
      "BindGuestPasid attaches the guest PASID as the IOASID's SPID (KVM installs it on the BIND) and programs a nested entry on the device; only the first device bind is first_bind",
    source: "vfio.proto BindGuestPasid; DESIGN §5 IOMMU (guest bind), KVM",
    async run(c) {
      const vm = await openVm(c, { kvm: true });
      const d1 = await pciDevice(c);
      const d2 = await pciDevice(c);
      await assign(c, vm, pci(d1));
      await assign(c, vm, pci(d2));
      const p = await alloc(c, vm);
      expectEqual((await bind(c, vm, pci(d1), p, 101)).firstBind, true, "first_bind of the first device bind");
      expectEqual((await c.h.core.describe({ ioasid: p.hpasid })).info!.spid, 101, "the IOASID's SPID");
      expectEqual(await iommuEntries(c, d1), [`${p.hpasid}:101@${vm.setId}`, `rid@${(await ridDomain(c, d1))!}`].sort(), "the device's entries at the IOMMU");
      expectEqual((await bind(c, vm, pci(d2), p, 101)).firstBind, false, "first_bind of the second device bind");
      expectEqual(await pasidsOf(c, vm.containerId), [`${p.hpasid}:101[${[d1, d2].join(",")}]`], "QueryState's PASIDs");
      await eventually(
        () => kvmTable(c, vm),
        (t) => t.includes(`101->${p.hpasid}`),
        "KVM's table to hold the bind (the core emitted BIND)",
      );
    },
  }),
  clause({
    id: "vfio.rpc.bind-guest-pasid.refused",
    statement:
      "BindGuestPasid on a device not assigned is DEVICE_NOT_ASSIGNED, with another guest PASID SPID_MISMATCH, twice on a device PASID_IN_USE, with a guest PASID the set uses INVALID_ARGUMENT SPID_IN_USE, of a stale generation STALE_GENERATION, of a freed IOASID IOASID_FREE_PENDING / IOASID_NOT_FOUND; none changes anything",
    source: "vfio.proto BindGuestPasid; DESIGN §3 (SPID unique per set), §8",
    async run(c) {
      const vm = await openVm(c);
      const d1 = await pciDevice(c);
      const d2 = await pciDevice(c);
      const elsewhere = await pciDevice(c);
      await assign(c, vm, pci(d1));
      await assign(c, vm, pci(d2));
      const p = await alloc(c, vm);
      const q = await alloc(c, vm);
      await bind(c, vm, pci(d1), p, 201);
      const snapshot = () => world(c, [vm], [d1, d2, elsewhere]);
      const refused = (what: string, code: Code, reason: string, call: () => Promise<unknown>) => expectRefusedUnchanged(snapshot, call, code, reason, what);
      await refused("a device not assigned", Code.FAILED_PRECONDITION, "DEVICE_NOT_ASSIGNED", () => bind(c, vm, pci(elsewhere), q, 202));
      await refused("another guest PASID for the IOASID", Code.FAILED_PRECONDITION, "SPID_MISMATCH", () => bind(c, vm, pci(d2), p, 203));
      await refused("the same device twice", Code.FAILED_PRECONDITION, "PASID_IN_USE", () => bind(c, vm, pci(d1), p, 201));
      await refused("a guest PASID another IOASID of the set has", Code.INVALID_ARGUMENT, "SPID_IN_USE", () => bind(c, vm, pci(d2), q, 201));
      await refused("a stale generation", Code.FAILED_PRECONDITION, "STALE_GENERATION", () =>
        bind(c, vm, pci(d2), { hpasid: q.hpasid, generation: q.generation + 1 }, 202),
      );
      const holder = { role: "conform", instance: c.h.uniqueName("holder"), purpose: "free-pending" };
      await c.h.core.get(P(core.GetRequest, { setId: vm.setId, ioasid: q.hpasid, holder }));
      await c.vfio.freePasid({ containerId: vm.containerId, hpasid: q.hpasid, generation: q.generation });
      try {
        await refused("a FREE_PENDING IOASID", Code.NOT_FOUND, "IOASID_FREE_PENDING", () => bind(c, vm, pci(d2), q, 202));
      } finally {
        await c.h.core.put(P(core.PutRequest, { setId: vm.setId, ioasid: q.hpasid, holder }));
      }
      await refused("a reclaimed IOASID", Code.NOT_FOUND, "IOASID_NOT_FOUND", () => bind(c, vm, pci(d2), q, 202));
    },
  }),
  clause({
    id: "vfio.rpc.unbind-guest-pasid",
    statement:
      "UnbindGuestPasid removes the device's entry at the IOMMU; the last device unbind detaches the SPID (the core emits UNBIND: KVM removes its entry); on a device not assigned it is DEVICE_NOT_ASSIGNED, with a stale generation STALE_GENERATION, neither changing anything",
    source: "vfio.proto UnbindGuestPasid; DESIGN §5 IOMMU (only the last unbind emits UNBIND)",
    async run(c) {
      const vm = await openVm(c, { kvm: true });
      const d1 = await pciDevice(c);
      const d2 = await pciDevice(c);
      const elsewhere = await pciDevice(c);
      await assign(c, vm, pci(d1));
      await assign(c, vm, pci(d2));
      const p = await alloc(c, vm);
      await bind(c, vm, pci(d1), p, 301);
      await bind(c, vm, pci(d2), p, 301);
      await eventually(
        () => kvmTable(c, vm),
        (t) => t.includes(`301->${p.hpasid}`),
        "KVM's table to hold the bind",
      );
      const snapshot = () => world(c, [vm], [d1, d2, elsewhere]);
      await expectRefusedUnchanged(snapshot, () => unbind(c, vm, pci(elsewhere), p), Code.FAILED_PRECONDITION, "DEVICE_NOT_ASSIGNED", "a device not assigned");
      await expectRefusedUnchanged(
        snapshot,
        () => unbind(c, vm, pci(d1), { hpasid: p.hpasid, generation: p.generation + 1 }),
        Code.FAILED_PRECONDITION,
        "STALE_GENERATION",
        "a stale generation",
      );
      expectEqual(await unbind(c, vm, pci(d1), p, 301), { unbound: true, lastUnbind: false }, "the first device's unbind");
      expectEqual(await iommuEntries(c, d1), [`rid@${(await ridDomain(c, d1))!}`], "the first device's entries at the IOMMU");
      expectEqual((await c.h.core.describe({ ioasid: p.hpasid })).info!.spid, 301, "the SPID while a device bind remains");
      expectEqual(await unbind(c, vm, pci(d2), p, 301), { unbound: true, lastUnbind: true }, "the last device's unbind");
      expectEqual(await iommuEntries(c, d2), [`rid@${(await ridDomain(c, d2))!}`], "the last device's entries at the IOMMU");
      expectEqual((await c.h.core.describe({ ioasid: p.hpasid })).info!.spid, 0, "the SPID after the last unbind");
      await eventually(
        () => kvmTable(c, vm),
        (t) => t.length === 0,
        "KVM's entry removed (the core emitted UNBIND)",
      );
      expectEqual(await pasidsOf(c, vm.containerId), [`${p.hpasid}:0[]`], "QueryState's PASIDs after the unbinds");
    },
  }),
  // ----- RPCs: faults
  clause({
    id: "vfio.rpc.watch-faults",
    statement:
      "WatchFaults relays a complete fault group raised under a guest bind, with the guest PASID; a newer WatchFaults ends the older with ABORTED FAULT_WATCHER_REPLACED and gets the unanswered group again; on no container it is NOT_FOUND CONTAINER_NOT_FOUND",
    source: "vfio.proto WatchFaults; DESIGN §5 Faults (VFIO relays to the VMM)",
    async run(c) {
      const g = await faultingGuest(c);
      expectEqual(
        {
          hpasid: g.group.hpasid,
          gpasid: g.group.gpasid,
          device: g.group.device,
          requests: g.group.requests.map((r) => ({ address: r.address, last: r.lastRequest })),
        },
        { hpasid: g.p.hpasid, gpasid: g.gpasid, device: pci(g.device), requests: [{ address: GVA, last: true }] },
        "the relayed fault group",
      );
      const ctr = (await containerOf(c, g.vm.containerId))!;
      expectEqual(
        { pending: ctr.pendingFaultGroups.map((x) => x.faultGroupId), watcher: ctr.faultWatcherAttached },
        { pending: [g.group.faultGroupId], watcher: true },
        "QueryState's fault groups",
      );
      const second = watch(c, g.vm.containerId);
      await expectRefused(
        g.w.ended.then((err) => {
          if (err !== undefined) throw err;
          return "the older stream completed OK";
        }),
        Code.ABORTED,
        "FAULT_WATCHER_REPLACED",
        "the replaced watcher's end",
      );
      await eventually(
        async () => second.groups().map((x) => x.faultGroupId),
        (ids) => ids.includes(g.group.faultGroupId),
        "the newer watcher to receive the unanswered group",
      );
      const none = watch(c, NO_CONTAINER);
      await expectRefused(
        none.ended.then((err) => {
          if (err !== undefined) throw err;
          return "the stream completed OK";
        }),
        Code.NOT_FOUND,
        "CONTAINER_NOT_FOUND",
        "WatchFaults on no container",
      );
    },
  }),
  clause({
    id: "vfio.rpc.send-page-response",
    statement:
      "SendPageResponse passes the VMM's answer to the IOMMU (the device sees it) and the watcher gets `answered`; code UNSPECIFIED and code FAILURE (the host's answer alone: it disables PRI for the whole function) are INVALID_ARGUMENT INVALID_FIELD, a group never given to the container INVALID_ARGUMENT FAULT_GROUP_NOT_GIVEN (the fault fd's -EINVAL), a second answer FAILED_PRECONDITION FAULT_GROUP_ALREADY_RESPONDED; none changes anything",
    source: "vfio.proto SendPageResponse; DESIGN §5 Faults (exactly one response; a VMM answers SUCCESS or INVALID; an unknown group is -EINVAL)",
    async run(c) {
      const g = await faultingGuest(c);
      const gid = g.group.faultGroupId;
      const respond = (faultGroupId: bigint, code: vfio.PageResponseCode) => () =>
        c.vfio.sendPageResponse({ containerId: g.vm.containerId, faultGroupId, code });
      const snapshot = () => world(c, [g.vm]);
      await expectRefusedUnchanged(
        snapshot,
        respond(gid, vfio.PageResponseCode.PAGE_RESPONSE_CODE_UNSPECIFIED),
        Code.INVALID_ARGUMENT,
        "INVALID_FIELD",
        "code UNSPECIFIED",
      );
      await expectRefusedUnchanged(
        snapshot,
        respond(gid, vfio.PageResponseCode.PAGE_RESPONSE_CODE_FAILURE),
        Code.INVALID_ARGUMENT,
        "INVALID_FIELD",
        "code FAILURE from a VMM",
      );
      await expectRefusedUnchanged(
        snapshot,
        respond(gid + 1_000_000n, vfio.PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS),
        Code.INVALID_ARGUMENT,
        "FAULT_GROUP_NOT_GIVEN",
        "a group never relayed",
      );
      // The guest installs the page, then answers SUCCESS.
      await c.vfio.mapGuestPages(
        P(vfio.MapGuestPagesRequest, { containerId: g.vm.containerId, hpasid: g.p.hpasid, iova: GVA, gpa: GPA, size: PAGE, access: RW }),
      );
      await respond(gid, vfio.PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS)();
      const seen = await c.iommu.awaitPageResponse({ deviceId: g.device, faultGroupId: gid }, { deadlineMs: 10_000 });
      expectEqual(
        { code: seen.code, source: seen.source },
        { code: iommu.PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS, source: iommu.PageResponseSource.PAGE_RESPONSE_SOURCE_HANDLER },
        "the response the device got",
      );
      await eventually(
        async () => g.w.answered().map((a) => ({ id: a.faultGroupId, code: a.code })),
        (a) => a.some((x) => x.id === gid && x.code === vfio.PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS),
        "the watcher to get `answered` SUCCESS",
      );
      expectEqual((await containerOf(c, g.vm.containerId))!.pendingFaultGroups, [], "QueryState's fault groups after the answer");
      await expectRefusedUnchanged(
        snapshot,
        respond(gid, vfio.PageResponseCode.PAGE_RESPONSE_CODE_INVALID),
        Code.FAILED_PRECONDITION,
        "FAULT_GROUP_ALREADY_RESPONDED",
        "a second answer",
      );
      const retry = await dma(c, g.device, g.p.hpasid, GVA);
      expectEqual(
        { outcome: retry.outcome, out: retry.outputAddress },
        { outcome: iommu.TranslateOutcome.TRANSLATE_OUTCOME_TRANSLATED, out: hpaOf(g.vm) },
        "the device's retry",
      );
    },
  }),
  // ----- RPCs: memory
  clause({
    id: "vfio.rpc.map-dma",
    statement:
      "MapDma maps guest memory in the VM's stage 2 (the assigned device's DMA translates through it) and UnmapDma removes it (bytes reported; unmapping nothing is 0); misaligned, empty, overlapping or accessless ranges are refused with the proto's reasons and change nothing",
    source: "vfio.proto MapDma, UnmapDma",
    async run(c) {
      const vm = await openVm(c);
      const device = await pciDevice(c, { pri: false });
      await assign(c, vm, pci(device));
      const map =
        (iova: bigint, size: bigint, access: object = RW) =>
        () =>
          c.vfio.mapDma(P(vfio.MapDmaRequest, { containerId: vm.containerId, iova, paddr: hpaOf(vm), size, access }));
      await map(GPA, STAGE2_SIZE)();
      const hit = await dma(c, device, 0, GPA + 0x2345n);
      expectEqual(
        { outcome: hit.outcome, out: hit.outputAddress },
        { outcome: iommu.TranslateOutcome.TRANSLATE_OUTCOME_TRANSLATED, out: hpaOf(vm) + 0x2345n },
        "the device's DMA after MapDma",
      );
      // What a refused call could change: the mappings of the VM's stage 2.
      const domain = (await ridDomain(c, device))!;
      const mappings = async () => (await c.iommu.queryState(P(iommu.QueryStateRequest, {}))).domains.find((d) => d.domainId === domain)?.mappings;
      await expectRefusedUnchanged(mappings, map(GPA + STAGE2_SIZE + 1n, PAGE), Code.INVALID_ARGUMENT, "ADDRESS_NOT_ALIGNED", "MapDma of a misaligned address");
      await expectRefusedUnchanged(mappings, map(GPA + STAGE2_SIZE, 0n), Code.INVALID_ARGUMENT, "INVALID_RANGE", "MapDma of nothing");
      await expectRefusedUnchanged(mappings, map(GPA, PAGE), Code.ALREADY_EXISTS, "IOVA_ALREADY_MAPPED", "MapDma over a mapping");
      await expectRefusedUnchanged(mappings, map(GPA + STAGE2_SIZE, PAGE, {}), Code.INVALID_ARGUMENT, "INVALID_FIELD", "MapDma with no access");
      const unmap = (iova: bigint, size: bigint) => c.vfio.unmapDma({ containerId: vm.containerId, iova, size });
      await expectRefusedUnchanged(mappings, () => unmap(GPA + 1n, PAGE), Code.INVALID_ARGUMENT, "ADDRESS_NOT_ALIGNED", "UnmapDma of a misaligned address");
      expectEqual((await unmap(GPA + STAGE2_SIZE * 4n, PAGE)).unmappedSize, 0n, "UnmapDma of nothing");
      expectEqual((await unmap(GPA, STAGE2_SIZE)).unmappedSize, STAGE2_SIZE, "UnmapDma of the mapping");
      const miss = await dma(c, device, 0, GPA + 0x2345n);
      expectThat(
        miss.outcome !== iommu.TranslateOutcome.TRANSLATE_OUTCOME_TRANSLATED,
        "the device's DMA not translated after UnmapDma",
        iommu.translateOutcomeToJSON(miss.outcome),
      );
    },
  }),
  clause({
    id: "vfio.rpc.map-guest-pages",
    statement:
      "MapGuestPages installs first-stage pages of a bound PASID (the device's DMA at that address translates through both stages) and UnmapGuestPages removes them; of an unbound PASID NOT_FOUND GUEST_BIND_NOT_FOUND, misaligned ADDRESS_NOT_ALIGNED, over a mapping IOVA_ALREADY_MAPPED; none changes anything",
    source: "vfio.proto MapGuestPages, UnmapGuestPages",
    async run(c) {
      // Not PRI-capable: a miss is a fault, not a page request nobody answers.
      const g = await boundGuest(c, { pri: false });
      const unboundPasid = await alloc(c, g.vm);
      const map =
        (hpasid: number, iova: bigint, size = PAGE) =>
        () =>
          c.vfio.mapGuestPages(P(vfio.MapGuestPagesRequest, { containerId: g.vm.containerId, hpasid, iova, gpa: GPA, size, access: RW }));
      await map(g.p.hpasid, GVA)();
      const probe = async () => {
        const a = await dma(c, g.device, g.p.hpasid, GVA + 0x10n);
        return { outcome: a.outcome, out: a.outputAddress };
      };
      expectEqual(
        await probe(),
        { outcome: iommu.TranslateOutcome.TRANSLATE_OUTCOME_TRANSLATED, out: hpaOf(g.vm) + 0x10n },
        "the device's DMA after MapGuestPages",
      );
      const snapshot = async () => ({ probe: await probe(), w: await world(c, [g.vm], [g.device]) });
      await expectRefusedUnchanged(snapshot, map(unboundPasid.hpasid, GVA), Code.NOT_FOUND, "GUEST_BIND_NOT_FOUND", "a PASID with no guest bind");
      await expectRefusedUnchanged(snapshot, map(g.p.hpasid, GVA + 0x1000_0001n), Code.INVALID_ARGUMENT, "ADDRESS_NOT_ALIGNED", "a misaligned address");
      await expectRefusedUnchanged(snapshot, map(g.p.hpasid, GVA), Code.ALREADY_EXISTS, "IOVA_ALREADY_MAPPED", "over a mapping");
      await expectRefusedUnchanged(
        snapshot,
        () => c.vfio.unmapGuestPages({ containerId: g.vm.containerId, hpasid: g.p.hpasid, generation: 0, iova: GVA + 1n, size: PAGE }),
        Code.INVALID_ARGUMENT,
        "ADDRESS_NOT_ALIGNED",
        "UnmapGuestPages of a misaligned address",
      );
      const un = await c.vfio.unmapGuestPages({ containerId: g.vm.containerId, hpasid: g.p.hpasid, generation: g.p.generation, iova: GVA, size: PAGE });
      expectEqual(un.unmappedSize, PAGE, "UnmapGuestPages' answer");
      const after = await probe();
      expectThat(
        after.outcome !== iommu.TranslateOutcome.TRANSLATE_OUTCOME_TRANSLATED,
        "the device's DMA not translated after UnmapGuestPages",
        iommu.translateOutcomeToJSON(after.outcome),
      );
    },
  }),
  clause({
    id: "vfio.rpc.query-state",
    statement:
      "QueryState of 0 lists every container ascending by id; of one container only it; of a container that does not exist NOT_FOUND CONTAINER_NOT_FOUND",
    source: "vfio.proto QueryState",
    async run(c) {
      const a = await openVm(c);
      const b = await openVm(c);
      const all = (await c.vfio.queryState({ containerId: 0 })).containers.map((x) => x.containerId);
      expectThat(all.includes(a.containerId) && all.includes(b.containerId), "both containers listed", all, "QueryState(0)");
      expectEqual(
        all,
        [...all].sort((x, y) => x - y),
        "QueryState(0)'s order",
      );
      expectEqual(
        (await c.vfio.queryState({ containerId: b.containerId })).containers.map((x) => x.containerId),
        [b.containerId],
        "QueryState of one container",
      );
      await expectRefused(c.vfio.queryState({ containerId: NO_CONTAINER }), Code.NOT_FOUND, "CONTAINER_NOT_FOUND", "QueryState of no container");
    },
  }),
  // ----- Authority: a container is reached only with its capability (DESIGN §3)
  clause({
    id: "vfio.capability.answered",
    statement:
      "OpenContainer answers a capability of 32 bytes, a different one for each container, and the calls naming the container that carry it are served",
    source: "vfio.proto OpenContainerResponse.capability; DESIGN §3 (authority is a capability, not a name)",
    async run(c) {
      const a = await openVm(c);
      const b = await openVm(c);
      const ca = c.vfio.capabilityOf(a.containerId);
      const cb = c.vfio.capabilityOf(b.containerId);
      expectEqual(ca?.length, 32, "the length of the capability OpenContainer answered");
      expectThat(ca !== undefined && cb !== undefined && !Buffer.from(ca).equals(Buffer.from(cb)), "two containers' capabilities differ", show([ca, cb]));
      // The stranger, given the capability, is the VMM: it is served.
      const p = await c.stranger.allocPasid({ containerId: a.containerId }, { metadata: vfioCapabilityMetadata(ca!) });
      expectThat(p.hpasid !== 0, "AllocPasid with the container's capability is served", show(p));
    },
  }),
  clause({
    id: "vfio.capability.missing",
    statement:
      "every call naming a container (Session, CloseContainer, AssignDevice, UnassignDevice, AllocPasid, FreePasid, BindGuestPasid, UnbindGuestPasid, WatchFaults, SendPageResponse, MapDma, UnmapDma, MapGuestPages, UnmapGuestPages) without a capability is PERMISSION_DENIED CAPABILITY_MISSING and changes nothing",
    source: "vfio.proto (file comment: capabilities); DESIGN §3 (authority is a capability, not a name)",
    async run(c) {
      const g = await faultingGuest(c);
      const spare = await pciDevice(c);
      for (const [rpc, call] of callsNaming(c, g, spare)) {
        await expectRefusedUnchanged(
          () => guestWorld(c, g, [], spare),
          () => call({}),
          Code.PERMISSION_DENIED,
          "CAPABILITY_MISSING",
          `${rpc} without a capability`,
        );
      }
    },
  }),
  clause({
    id: "vfio.capability.other-container",
    statement:
      "every call naming a container with another container's capability (another VM's VMM) or a malformed one is PERMISSION_DENIED CAPABILITY_NOT_FOR_CONTAINER and changes nothing of either VM",
    source: "vfio.proto (file comment: capabilities); DESIGN §3 (authority is a capability, not a name), §7 S3",
    async run(c) {
      const g = await faultingGuest(c);
      const other = await openVm(c);
      const spare = await pciDevice(c);
      const theirs = vfioCapabilityMetadata(c.vfio.capabilityOf(other.containerId)!);
      for (const [what, metadata] of [
        ["another VM's capability", theirs],
        ["a malformed capability", { "ioasid-vfio-capability": "not-hex" }],
      ] as const) {
        for (const [rpc, call] of callsNaming(c, g, spare)) {
          await expectRefusedUnchanged(
            () => guestWorld(c, g, [other], spare),
            () => call({ metadata }),
            Code.PERMISSION_DENIED,
            "CAPABILITY_NOT_FOR_CONTAINER",
            `${rpc} with ${what}`,
          );
        }
      }
    },
  }),
  clause({
    id: "vfio.capability.closed-container",
    statement:
      "a closed container's capability opens nothing: calls naming the closed container are NOT_FOUND CONTAINER_NOT_FOUND, and calls naming a later container with it are PERMISSION_DENIED CAPABILITY_NOT_FOR_CONTAINER and change nothing",
    source: "vfio.proto (file comment: capabilities; container ids are never reused); DESIGN §3",
    async run(c) {
      const old = await openVm(c);
      const oldCapability = vfioCapabilityMetadata(c.vfio.capabilityOf(old.containerId)!);
      await c.vfio.closeContainer({ containerId: old.containerId });
      await eventually(
        () => containerOf(c, old.containerId),
        (x) => x === undefined,
        "the closed container gone",
      );
      await expectRefused(
        c.stranger.allocPasid({ containerId: old.containerId }, { metadata: oldCapability }),
        Code.NOT_FOUND,
        "CONTAINER_NOT_FOUND",
        "AllocPasid naming the closed container",
      );
      const g = await faultingGuest(c);
      const spare = await pciDevice(c);
      for (const [rpc, call] of callsNaming(c, g, spare)) {
        await expectRefusedUnchanged(
          () => guestWorld(c, g, [], spare),
          () => call({ metadata: oldCapability }),
          Code.PERMISSION_DENIED,
          "CAPABILITY_NOT_FOR_CONTAINER",
          `${rpc} with a closed container's capability`,
        );
      }
    },
  }),
  // ----- Host memory: a VMM maps only memory its VM was given (issue 14 item 3)
  clause({
    id: "vfio.host-memory.given-only",
    statement:
      "OpenContainer gives each VM guest_memory_size bytes of host memory (guest_memory), never overlapping another live VM's, and refuses a size that is not a multiple of 4 KiB (INVALID_FIELD, creating nothing); MapDma maps inside the VM's memory, and of any other host memory — another VM's, memory given to nobody, a range straddling the end of its own — is PERMISSION_DENIED HOST_MEMORY_NOT_GIVEN and changes nothing of either VM (their containers, sets and stage 2)",
    source: "vfio.proto OpenContainer, MapDma (file comment: host memory is given, not named); errors.proto HOST_MEMORY_NOT_GIVEN",
    async run(c) {
      const a = await openVm(c);
      const b = await openVm(c);
      for (const vm of [a, b]) {
        const total = vm.guestMemory.reduce((s, r) => s + r.size, 0n);
        expectEqual(total, GUEST_MEMORY, `the host memory given to container ${vm.containerId} (guest_memory_size)`);
      }
      const overlapping = a.guestMemory.some((x) => b.guestMemory.some((y) => x.paddr < y.paddr + y.size && y.paddr < x.paddr + x.size));
      expectThat(!overlapping, "two live VMs' host memory does not overlap", show({ a: a.guestMemory, b: b.guestMemory }));
      const before = c.maxContainerId;
      await expectRefused(
        c.vfio.openContainer(P(vfio.OpenContainerRequest, { mmToken: c.h.uniqueToken(), quota: 1, guestMemorySize: PAGE + 1n })),
        Code.INVALID_ARGUMENT,
        "INVALID_FIELD",
        "OpenContainer with a guest_memory_size that is not a multiple of 4 KiB",
      );
      expectEqual(
        (await c.vfio.queryState({ containerId: 0 })).containers.filter((x) => x.containerId > before).map((x) => x.containerId),
        [],
        "containers created by the refused OpenContainer",
      );
      // Each VM with a device, so its stage 2 exists and a refused MapDma can be seen to change it.
      const da = await pciDevice(c, { pri: false });
      const db = await pciDevice(c, { pri: false });
      await assign(c, a, pci(da));
      await assign(c, b, pci(db));
      await c.vfio.mapDma(P(vfio.MapDmaRequest, { containerId: a.containerId, iova: GPA, paddr: hpaOf(a), size: STAGE2_SIZE, access: RW }));
      const stage2 = async (deviceId: string) => {
        const domain = await ridDomain(c, deviceId);
        return (await c.iommu.queryState(P(iommu.QueryStateRequest, {}))).domains.find((d) => d.domainId === domain)?.mappings;
      };
      const both = async () => ({ w: await world(c, [a, b], [da, db]), a: await stage2(da), b: await stage2(db) });
      const mine = b.guestMemory[b.guestMemory.length - 1]!;
      const given = [...a.guestMemory, ...b.guestMemory];
      const end = given.reduce((m, r) => (r.paddr + r.size > m ? r.paddr + r.size : m), 0n);
      for (const [what, paddr, size] of [
        ["VM A's host memory", hpaOf(a), PAGE],
        ["all of VM A's host memory", a.guestMemory[0]!.paddr, a.guestMemory[0]!.size],
        ["host memory past A's and B's", end + STAGE2_SIZE, PAGE],
        ["a range straddling the end of its own memory", mine.paddr + mine.size - PAGE, 2n * PAGE],
      ] as const) {
        await expectRefusedUnchanged(
          both,
          () => c.vfio.mapDma(P(vfio.MapDmaRequest, { containerId: b.containerId, iova: GPA, paddr, size, access: RW })),
          Code.PERMISSION_DENIED,
          "HOST_MEMORY_NOT_GIVEN",
          `MapDma by VM B's VMM of ${what}`,
        );
      }
      // B's own memory maps, and B's device then reaches it, not A's.
      await c.vfio.mapDma(P(vfio.MapDmaRequest, { containerId: b.containerId, iova: GPA, paddr: hpaOf(b), size: STAGE2_SIZE, access: RW }));
      const hit = await dma(c, db, 0, GPA + 0x2345n);
      expectEqual(
        { outcome: hit.outcome, out: hit.outputAddress },
        { outcome: iommu.TranslateOutcome.TRANSLATE_OUTCOME_TRANSLATED, out: hpaOf(b) + 0x2345n },
        "VM B's device's DMA after B mapped its own memory",
      );
    },
  }),
  // ----- Isolation: every call stays inside the container's set (S3)
  clause({
    id: "vfio.isolation.free-other-vm",
    statement: "FreePasid naming one VM's container with another VM's host PASID is PERMISSION_DENIED IOASID_NOT_IN_SET and changes nothing of either VM",
    source: "vfio.proto FreePasid; DESIGN §3 (ownership), §7 S3",
    async run(c) {
      const a = await boundGuest(c, { kvm: true });
      const b = await openVm(c);
      await alloc(c, b);
      await eventually(
        () => kvmTable(c, a.vm),
        (t) => t.length === 1,
        "KVM's entry of the bound PASID",
      );
      const snapshot = async () => ({ w: await world(c, [a.vm, b], [a.device]), kvm: await kvmTable(c, a.vm) });
      for (const generation of [0, a.p.generation]) {
        await expectRefusedUnchanged(
          snapshot,
          () => c.vfio.freePasid({ containerId: b.containerId, hpasid: a.p.hpasid, generation }),
          Code.PERMISSION_DENIED,
          "IOASID_NOT_IN_SET",
          `FreePasid of another VM's PASID (generation ${generation})`,
        );
      }
    },
  }),
  clause({
    id: "vfio.isolation.bind-other-vm",
    statement:
      "BindGuestPasid, UnbindGuestPasid and MapGuestPages naming one VM's container (and its own device) with another VM's host PASID are PERMISSION_DENIED IOASID_NOT_IN_SET and change nothing of either VM",
    source: "vfio.proto BindGuestPasid, UnbindGuestPasid, MapGuestPages; DESIGN §3 (ownership), §7 S3",
    async run(c) {
      const a = await boundGuest(c);
      const b = await boundGuest(c);
      const snapshot = () => world(c, [a.vm, b.vm], [a.device, b.device]);
      await expectRefusedUnchanged(
        snapshot,
        () => bind(c, b.vm, pci(b.device), a.p, 78),
        Code.PERMISSION_DENIED,
        "IOASID_NOT_IN_SET",
        "BindGuestPasid of another VM's PASID",
      );
      await expectRefusedUnchanged(
        snapshot,
        () => unbind(c, b.vm, pci(b.device), { hpasid: a.p.hpasid, generation: 0 }),
        Code.PERMISSION_DENIED,
        "IOASID_NOT_IN_SET",
        "UnbindGuestPasid of another VM's PASID",
      );
      await expectRefusedUnchanged(
        snapshot,
        () =>
          c.vfio.mapGuestPages(
            P(vfio.MapGuestPagesRequest, { containerId: b.vm.containerId, hpasid: a.p.hpasid, iova: GVA, gpa: GPA, size: PAGE, access: RW }),
          ),
        Code.PERMISSION_DENIED,
        "IOASID_NOT_IN_SET",
        "MapGuestPages of another VM's PASID",
      );
    },
  }),
  clause({
    id: "vfio.isolation.device-of-other-vm",
    statement:
      "a device or mdev assigned to one VM cannot be assigned to another (FAILED_PRECONDITION DEVICE_BUSY), nor unassigned or bound through another's container (DEVICE_NOT_ASSIGNED); nothing changes",
    source: "vfio.proto AssignDevice, UnassignDevice, BindGuestPasid; DESIGN §3 (ownership), §7 S3",
    async run(c) {
      const a = await openVm(c);
      const m = await mdevDevice(c);
      await assign(c, a, mdevRef(m.uuid));
      const device = await pciDevice(c);
      await assign(c, a, pci(device));
      const pa = await alloc(c, a);
      await bind(c, a, pci(device), pa, 90);
      const b = await openVm(c);
      const pb = await alloc(c, b);
      const snapshot = async () => ({ w: await world(c, [a, b], [device, m.parent]), mdev: await vdcmView(c, m) });
      for (const d of [pci(device), mdevRef(m.uuid)]) {
        await expectRefusedUnchanged(
          snapshot,
          () => c.vfio.assignDevice(P(vfio.AssignDeviceRequest, { containerId: b.containerId, device: d })),
          Code.FAILED_PRECONDITION,
          "DEVICE_BUSY",
          `AssignDevice of ${refName(d)}, another VM's`,
        );
        await expectRefusedUnchanged(
          snapshot,
          () => c.vfio.unassignDevice(P(vfio.UnassignDeviceRequest, { containerId: b.containerId, device: d })),
          Code.FAILED_PRECONDITION,
          "DEVICE_NOT_ASSIGNED",
          `UnassignDevice of ${refName(d)} through another VM's container`,
        );
      }
      await expectRefusedUnchanged(
        snapshot,
        () => bind(c, b, pci(device), pb, 91),
        Code.FAILED_PRECONDITION,
        "DEVICE_NOT_ASSIGNED",
        "a bind on another VM's device",
      );
    },
  }),
  clause({
    id: "vfio.isolation.fault-group-of-other-vm",
    statement:
      "a fault group is relayed only to its own VM's watcher, and SendPageResponse naming another VM's container is INVALID_ARGUMENT FAULT_GROUP_NOT_GIVEN (never given to that container; nothing told of the other VM's group): the group stays unanswered",
    source: "vfio.proto SendPageResponse, WatchFaults; DESIGN §3 (fault groups are a VM's), §5 Faults, §7 S3",
    async run(c) {
      const other = await openVm(c);
      const theirs = await watching(c, other.containerId);
      const g = await faultingGuest(c);
      const gid = g.group.faultGroupId;
      const groupState = async () =>
        (await c.iommu.queryState(P(iommu.QueryStateRequest, { deviceIds: [g.device] }))).faultGroups.find((x) => x.faultGroupId === gid)?.state;
      const snapshot = async () => ({ w: await world(c, [g.vm, other]), atIommu: await groupState() });
      await expectRefusedUnchanged(
        snapshot,
        () => c.vfio.sendPageResponse({ containerId: other.containerId, faultGroupId: gid, code: vfio.PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS }),
        Code.INVALID_ARGUMENT,
        "FAULT_GROUP_NOT_GIVEN",
        "an answer to another VM's fault group",
      );
      expectEqual(await groupState(), iommu.FaultGroupState.FAULT_GROUP_STATE_PENDING, "the group at the IOMMU");
      expectEqual(
        theirs.groups().map((x) => x.faultGroupId),
        [],
        "fault groups relayed to the other VM's watcher",
      );
    },
  }),
  clause({
    id: "vfio.isolation.close-one-vm",
    statement: "closing one VM's container frees its set only: another VM's IOASIDs, binds, KVM entries and devices are untouched",
    source: "DESIGN §5 VFIO, §7 S3",
    async run(c) {
      const a = await boundGuest(c, { kvm: true });
      const b = await boundGuest(c, { kvm: true });
      await eventually(
        async () => [await kvmTable(c, a.vm), await kvmTable(c, b.vm)],
        (t) => t[0]!.length === 1 && t[1]!.length === 1,
        "KVM's entries of both VMs",
      );
      const keep = async () => ({ w: await world(c, [a.vm], [a.device]), kvm: await kvmTable(c, a.vm) });
      const before = await keep();
      await c.vfio.closeContainer({ containerId: b.vm.containerId });
      await eventually(
        () => setExists(c, b.vm.setId),
        (x) => !x,
        "the closed VM's set destroyed",
      );
      expectEqual(await keep(), before, "the other VM after the close");
    },
  }),
  // ----- References: VFIO holds none
  clause({
    id: "vfio.references.holds-none",
    statement:
      "VFIO holds no IOASID references: after AllocPasid, binds on a device and an mdev and the guest's WQ programming, every holder is the set owner or a notifier role",
    source: "DESIGN §5 VFIO (it holds no IOASID references); vfio.proto (file comment)",
    async run(c) {
      const vm = await openVm(c, { kvm: true });
      const m = await mdevDevice(c);
      await assign(c, vm, mdevRef(m.uuid));
      const device = await pciDevice(c);
      await assign(c, vm, pci(device));
      const p = await alloc(c, vm);
      const q = await alloc(c, vm);
      await bind(c, vm, pci(device), p, 61);
      await bind(c, vm, mdevRef(m.uuid), q, 62);
      await c.vdcm.writeWqPasid({ mdevUuid: m.uuid, virtualWq: 0, gpasid: 62 });
      await eventually(
        () => kvmTable(c, vm),
        (t) => t.length === 2,
        "KVM's entries of both binds",
      );
      const known = ["set-owner", "kvm", "iommu", "vdcm"];
      const holders = [...((await holdersOf(c.h, p.hpasid)) ?? []), ...((await holdersOf(c.h, q.hpasid)) ?? [])];
      const foreign = holders.filter((x) => !known.includes(x.split("/")[0]!));
      expectEqual(foreign, [], `holders other than ${known.join(", ")} (all: ${holders.join(" ")})`);
    },
  }),
  // ----- Effects: freeing, sessions ending, misbehaving guests
  clause({
    id: "vfio.free.teardown-in-order",
    statement:
      "FreePasid of a bound, programmed PASID (before unbind) makes the core emit one FREE: when it reaches the last tier (played by the kit) KVM, VDCM and the IOMMU have cleared it, and it is reclaimed",
    source: "DESIGN §5 VFIO (free before unbind), §4.1 tier order, §7 S5, S8",
    async run(c) {
      const token = c.h.uniqueToken();
      const last = await tierFor(c, Priority.PRIORITY_LAST, token);
      const vm = await openVm(c, { token, kvm: true });
      const m = await mdevDevice(c);
      await assign(c, vm, mdevRef(m.uuid));
      const p = await alloc(c, vm);
      await bind(c, vm, mdevRef(m.uuid), p, 33);
      await c.vdcm.writeWqPasid({ mdevUuid: m.uuid, virtualWq: 0, gpasid: 33 });
      await eventually(
        () => kvmTable(c, vm),
        (t) => t.includes(`33->${p.hpasid}`),
        "KVM's entry of the bind",
      );
      const atLast = last.onDelivery(eventOf(EventType.EVENT_TYPE_FREE, p.hpasid), async () => ({
        kvm: await kvmTable(c, vm),
        vdcm: (await vdcmView(c, m)).entries,
        iommu: (await iommuEntries(c, m.parent)).filter((e) => e.startsWith(`${p.hpasid}:`)),
      }));
      expectEqual(
        await c.vfio.freePasid({ containerId: vm.containerId, hpasid: p.hpasid, generation: p.generation }),
        { reclaimed: false, alreadyFreePending: false },
        "FreePasid before unbind",
      );
      expectEqual(await atLast, { kvm: [], vdcm: [], iommu: [] }, "KVM's, VDCM's and the IOMMU's entries when the FREE reached the last tier");
      await eventually(
        () => reclaimed(c, p),
        (x) => x,
        "the IOASID reclaimed",
      );
      const frees = new Set(last.received.filter((d) => d.event.type === EventType.EVENT_TYPE_FREE && d.event.ioasid === p.hpasid).map((d) => d.event.seq));
      expectEqual(frees.size, 1, "FREE events of the IOASID");
      expectEqual(await pasidsOf(c, vm.containerId), [], "QueryState's PASIDs once reclaimed");
    },
  }),
  clause({
    id: "vfio.session.end-frees-set",
    statement:
      "when the VMM's Session ends without a close (its connection dropped, as when it crashes), every IOASID of the set is freed; once the roles ack they are reclaimed, the set destroyed, KVM's, VDCM's and the IOMMU's entries gone, the devices given back and the container gone",
    source: "DESIGN §5 VFIO (the crashed-guest path); vfio.proto Session (SESSION_ENDED)",
    async run(c) {
      const vm = await openVm(c, { kvm: true });
      const m = await mdevDevice(c);
      await assign(c, vm, mdevRef(m.uuid));
      const device = await pciDevice(c);
      await assign(c, vm, pci(device));
      const p1 = await alloc(c, vm);
      const p2 = await alloc(c, vm);
      const p3 = await alloc(c, vm);
      await bind(c, vm, pci(device), p1, 51);
      await bind(c, vm, mdevRef(m.uuid), p2, 52);
      await c.vdcm.writeWqPasid({ mdevUuid: m.uuid, virtualWq: 0, gpasid: 52 });
      await eventually(
        () => kvmTable(c, vm),
        (t) => t.length === 2,
        "KVM's entries of both binds",
      );
      vm.session!.cancel();
      await eventually(
        async () => ({
          set: await setExists(c, vm.setId),
          reclaimed: [await reclaimed(c, p1), await reclaimed(c, p2), await reclaimed(c, p3)],
          container: (await containerOf(c, vm.containerId))?.state,
        }),
        (x) => !x.set && x.reclaimed.every((r) => r) && x.container === undefined,
        "the set destroyed, its three IOASIDs reclaimed and the container gone",
      );
      await eventually(
        async () => ({ kvm: await kvmTable(c, vm), vdcm: await vdcmView(c, m), pci: await iommuEntries(c, device), parent: await iommuEntries(c, m.parent) }),
        (x) => x.kvm.length === 0 && x.vdcm.setId === 0 && x.vdcm.entries.length === 0 && x.pci.length === 0 && x.parent.length === 0,
        "every role's entries of the VM gone and its devices given back",
      );
    },
  }),
  clause({
    id: "vfio.session.never-attached",
    statement:
      "a container whose Session does not attach within its session_grace_ms is closed as crashed: its IOASIDs freed, the set destroyed, the container gone",
    source: "vfio.proto OpenContainer (SESSION_NEVER_ATTACHED)",
    async run(c) {
      const vm = await openVm(c, { session: false, graceMs: 1000 });
      // On a busy machine the grace period may run out before this allocation: then there is no
      // IOASID to follow, and the set and the container must still go.
      const p = await alloc(c, vm).catch((err: unknown) => {
        if (isDomainError(err, "CONTAINER_CLOSING") || isDomainError(err, "CONTAINER_NOT_FOUND")) return undefined;
        throw err;
      });
      await eventually(
        async () => ({
          set: await setExists(c, vm.setId),
          p: p === undefined || (await reclaimed(c, p)),
          container: await containerOf(c, vm.containerId),
        }),
        (x) => !x.set && x.p && x.container === undefined,
        "the set destroyed, its IOASID reclaimed and the container gone after the grace period",
      );
    },
  }),
  clause({
    id: "vfio.misbehaving.free-before-unbind",
    statement:
      "a guest that frees a bound PASID before unbinding hurts only itself: the FREE tears the bind down, the late UnbindGuestPasid finds nothing (unbound false) and changes nothing, and another VM binding the same guest PASID is untouched",
    source: "DESIGN §5 VFIO (misbehaviour stays confined), §6 (misbehaving guest); vfio.proto FreePasid, UnbindGuestPasid",
    async run(c) {
      const a = await boundGuest(c, { kvm: true });
      const b = await boundGuest(c, { kvm: true });
      await eventually(
        async () => [await kvmTable(c, a.vm), await kvmTable(c, b.vm)],
        (t) => t[0]!.length === 1 && t[1]!.length === 1,
        "KVM's entries of both VMs (the same guest PASID)",
      );
      const other = async () => ({ w: await world(c, [b.vm], [b.device]), kvm: await kvmTable(c, b.vm) });
      const before = await other();
      await c.vfio.freePasid({ containerId: a.vm.containerId, hpasid: a.p.hpasid, generation: a.p.generation });
      await eventually(
        async () => ({ r: await reclaimed(c, a.p), kvm: await kvmTable(c, a.vm), entries: await iommuEntries(c, a.device) }),
        (x) => x.r && x.kvm.length === 0 && x.entries.every((e) => e.startsWith("rid@")),
        "the freed PASID torn down everywhere and reclaimed",
      );
      const mine = () => world(c, [a.vm], [a.device]);
      const beforeLate = await mine();
      expectEqual(await unbind(c, a.vm, pci(a.device), a.p, a.gpasid), { unbound: false, lastUnbind: false }, "the late UnbindGuestPasid");
      expectEqual(await mine(), beforeLate, "the guest's own state after the late unbind");
      expectEqual(await other(), before, "the other VM after the guest's free and late unbind");
    },
  }),
  clause({
    id: "vfio.misbehaving.unbind-twice",
    statement: "a second UnbindGuestPasid finds nothing (unbound false): the core emitted one UNBIND, and nothing changes",
    source: "DESIGN §5 VFIO (misbehaviour stays confined); vfio.proto UnbindGuestPasid",
    async run(c) {
      const token = c.h.uniqueToken();
      const tier = await tierFor(c, Priority.PRIORITY_LAST, token);
      const vm = await openVm(c, { token });
      const device = await pciDevice(c);
      await assign(c, vm, pci(device));
      const p = await alloc(c, vm);
      await bind(c, vm, pci(device), p, 44);
      expectEqual(await unbind(c, vm, pci(device), p, 44), { unbound: true, lastUnbind: true }, "the first unbind");
      await reachedTier(tier, EventType.EVENT_TYPE_UNBIND, p.hpasid);
      const before = await world(c, [vm], [device]);
      expectEqual(await unbind(c, vm, pci(device), p, 44), { unbound: false, lastUnbind: false }, "the second unbind");
      expectEqual(await world(c, [vm], [device]), before, "the VM after the second unbind");
      // Events of one IOASID reach a tier in sequence order (§4.2): once its next event (the FREE) has
      // arrived, any second UNBIND would have arrived before it.
      // The IOMMU keeps its reference until the FREE (ioasid.rst steps 22-23): the free emits FREE.
      await c.vfio.freePasid({ containerId: vm.containerId, hpasid: p.hpasid, generation: p.generation });
      await reachedTier(tier, EventType.EVENT_TYPE_FREE, p.hpasid);
      const unbinds = tier.received.filter((d) => d.event.type === EventType.EVENT_TYPE_UNBIND && d.event.ioasid === p.hpasid).map((d) => d.event.seq);
      expectEqual(new Set(unbinds).size, 1, "UNBIND events of the IOASID");
    },
  }),
  clause({
    id: "vfio.misbehaving.never-allocated",
    statement:
      "FreePasid, BindGuestPasid and MapGuestPages of a host PASID the guest never allocated are refused (NOT_FOUND IOASID_NOT_FOUND / GUEST_BIND_NOT_FOUND) and change nothing",
    source: "DESIGN §5 VFIO (a PASID it never allocated stays confined); vfio.proto FreePasid, BindGuestPasid, MapGuestPages",
    async run(c) {
      const g = await boundGuest(c);
      const ghost = { hpasid: NEVER_ALLOCATED, generation: 0 };
      const snapshot = () => world(c, [g.vm], [g.device]);
      await expectRefusedUnchanged(
        snapshot,
        () => c.vfio.freePasid({ containerId: g.vm.containerId, hpasid: ghost.hpasid, generation: 0 }),
        Code.NOT_FOUND,
        "IOASID_NOT_FOUND",
        "FreePasid",
      );
      await expectRefusedUnchanged(snapshot, () => bind(c, g.vm, pci(g.device), ghost, 88), Code.NOT_FOUND, "IOASID_NOT_FOUND", "BindGuestPasid");
      await expectRefusedUnchanged(
        snapshot,
        () =>
          c.vfio.mapGuestPages(
            P(vfio.MapGuestPagesRequest, { containerId: g.vm.containerId, hpasid: ghost.hpasid, iova: GVA, gpa: GPA, size: PAGE, access: RW }),
          ),
        Code.NOT_FOUND,
        "GUEST_BIND_NOT_FOUND",
        "MapGuestPages",
      );
    },
  }),
  // ----- Order
  clause({
    id: "vfio.order.devices-after-reclaim",
    statement:
      "a closing container gives its mdev back only after the set's FREEs went through every tier: when a FREE reaches the CPU tier (played by the kit) the container is CLOSING, the mdev still assigned and programmed, and calls on it are FAILED_PRECONDITION CONTAINER_CLOSING",
    source: "vfio.proto CloseContainer (devices unassigned once the IOASIDs are reclaimed); DESIGN §7 S5",
    async run(c) {
      const token = c.h.uniqueToken();
      const cpu = await tierFor(c, Priority.PRIORITY_CPU, token);
      const vm = await openVm(c, { token });
      const m = await mdevDevice(c);
      await assign(c, vm, mdevRef(m.uuid));
      const p = await alloc(c, vm);
      await bind(c, vm, mdevRef(m.uuid), p, 55);
      await c.vdcm.writeWqPasid({ mdevUuid: m.uuid, virtualWq: 0, gpasid: 55 });
      const atCpu = cpu.onDelivery(eventOf(EventType.EVENT_TYPE_FREE, p.hpasid), async () => {
        const seen = { state: (await containerOf(c, vm.containerId))?.state, mdev: await vdcmView(c, m) };
        await expectRefusedUnchanged(
          () => world(c, [vm]),
          () => alloc(c, vm),
          Code.FAILED_PRECONDITION,
          "CONTAINER_CLOSING",
          "AllocPasid on the closing container",
        );
        return seen;
      });
      await c.vfio.closeContainer({ containerId: vm.containerId });
      expectEqual(
        await atCpu,
        { state: vfio.ContainerState.CONTAINER_STATE_CLOSING, mdev: { setId: vm.setId, entries: [`${p.hpasid}:55`] } },
        "the container and the mdev when the FREE reached the CPU tier",
      );
      await eventually(
        async () => ({ set: await setExists(c, vm.setId), mdev: await vdcmView(c, m), ctr: await containerOf(c, vm.containerId) }),
        (x) => !x.set && x.mdev.setId === 0 && x.ctr === undefined,
        "the set destroyed, then the mdev given back and the container gone",
      );
    },
  }),
  // ----- History
  clause({
    id: "vfio.history.records-changes",
    statement:
      "every change is recorded with the catalogue's action and fields: container_open, session_attach, device_assign, vfio_map_dma, vcmd_alloc, bind_gpasid, unbind_gpasid, vcmd_free, container_close (CLOSED), device_unassign (teardown), container_release",
    source: "DESIGN §7 (checked from recorded history); history.proto",
    async run(c) {
      const since = Date.now();
      const vm = await openVm(c, { quota: 4 });
      const device = await pciDevice(c);
      await assign(c, vm, pci(device));
      await c.vfio.mapDma(P(vfio.MapDmaRequest, { containerId: vm.containerId, iova: GPA, paddr: hpaOf(vm), size: PAGE, access: RW }));
      const p = await alloc(c, vm);
      const b = await bind(c, vm, pci(device), p, 66);
      await unbind(c, vm, pci(device), p, 66);
      await c.vfio.freePasid({ containerId: vm.containerId, hpasid: p.hpasid, generation: p.generation });
      await c.vfio.closeContainer({ containerId: vm.containerId });
      const ctr = vm.containerId;
      const onP = { ioasid: p.hpasid, setId: vm.setId };
      // In the order the calls were made; the teardown's device_unassign comes between container_close and container_release.
      const want = [
        { action: "containerOpen", value: { mmToken: vm.token, quota: 4, guestMemory: vm.guestMemory }, setId: vm.setId },
        { action: "sessionAttach", value: {}, setId: vm.setId },
        { action: "deviceAssign", value: { device, kind: "device" }, setId: vm.setId },
        { action: "vfioMapDma", value: { gpa: GPA, hpa: hpaOf(vm), size: PAGE }, setId: vm.setId },
        { action: "vcmdAlloc", value: { generation: p.generation }, ...onP },
        { action: "bindGpasid", value: { device, kind: "device", handle: b.handleId, first: true, spid: 66 }, ...onP },
        { action: "unbindGpasid", value: { device, kind: "device", last: true, spid: 66 }, ...onP },
        { action: "vcmdFree", value: { outcome: "FREE_PENDING" }, ...onP },
        { action: "containerClose", value: { reason: "CLOSED", freed: 0, unassigning: 1 }, setId: vm.setId },
        { action: "deviceUnassign", value: { device, kind: "device", teardown: true }, setId: vm.setId },
        { action: "containerRelease", value: {}, setId: vm.setId },
      ];
      await eventually(
        async () =>
          (await c.h.history(since - 1, "vfio"))
            .filter((r) => (r.action.value as { container?: number }).container === ctr)
            .map((r) => {
              const base = { action: r.action.$case, ...(r.ioasid === undefined ? {} : { ioasid: r.ioasid }), setId: r.setId };
              // history.proto: device_kind is "mdev" or "device" (a physical device).
              const kind = (k: string) => k;
              const a = r.action;
              switch (a.$case) {
                case "containerOpen":
                  return { ...base, value: { mmToken: a.value.mmToken, quota: a.value.quota, guestMemory: a.value.guestMemory } };
                case "deviceAssign":
                  return { ...base, value: { device: a.value.device, kind: kind(a.value.deviceKind) } };
                case "vfioMapDma":
                  return { ...base, value: { gpa: a.value.gpa, hpa: a.value.hpa, size: a.value.size } };
                case "vcmdAlloc":
                  return { ...base, value: { generation: r.generation } };
                case "bindGpasid":
                  return {
                    ...base,
                    value: { device: a.value.device, kind: kind(a.value.deviceKind), handle: a.value.handle, first: a.value.first, spid: r.spid },
                  };
                case "unbindGpasid":
                  return { ...base, value: { device: a.value.device, kind: kind(a.value.deviceKind), last: a.value.last, spid: r.spid } };
                case "vcmdFree":
                  return { ...base, value: { outcome: a.value.outcome } };
                case "containerClose":
                  return { ...base, value: { reason: a.value.reason, freed: a.value.freed, unassigning: a.value.unassigning } };
                case "deviceUnassign":
                  return { ...base, value: { device: a.value.device, kind: kind(a.value.deviceKind), teardown: a.value.teardown } };
                default:
                  return { ...base, value: {} };
              }
            }),
        (got) => isDeepStrictEqual(got, want),
        `history records of container ${ctr}: ${show(want.map((w) => w.action))}`,
      );
    },
  }),
  // ----- Restart
  clause({
    id: "vfio.restart.closes-kept-containers",
    statement:
      "killed -9 and restarted, VFIO closes the containers it had (their sessions died with it: SERVICE_RESTARTED): every IOASID of their sets freed and reclaimed, KVM's and VDCM's entries gone, the mdev given back, the device detached, the stage-2 domain freed",
    source: "vfio.proto CloseReason SERVICE_RESTARTED; DESIGN §5 VFIO (crashed-guest path), §12 (restart)",
    needs: ["restart"],
    async run(c) {
      const since = Date.now();
      const vm = await openVm(c, { kvm: true });
      const m = await mdevDevice(c);
      await assign(c, vm, mdevRef(m.uuid));
      const device = await pciDevice(c);
      await assign(c, vm, pci(device));
      await c.vfio.mapDma(P(vfio.MapDmaRequest, { containerId: vm.containerId, iova: GPA, paddr: hpaOf(vm), size: STAGE2_SIZE, access: RW }));
      const p1 = await alloc(c, vm);
      const p2 = await alloc(c, vm);
      await bind(c, vm, pci(device), p1, 21);
      await bind(c, vm, mdevRef(m.uuid), p2, 22);
      await c.vdcm.writeWqPasid({ mdevUuid: m.uuid, virtualWq: 0, gpasid: 22 });
      await eventually(
        () => kvmTable(c, vm),
        (t) => t.length === 2,
        "KVM's entries of both binds",
      );
      const stage2 = (await ridDomain(c, device))!;
      await c.h.killTarget();
      // While VFIO is away nothing frees the set (its sessions are gone, its containers are not closed yet).
      expectEqual(await setExists(c, vm.setId), true, "the set while VFIO is down");
      await c.h.startTarget();
      await eventually(
        async () => ({
          set: await setExists(c, vm.setId),
          reclaimed: [await reclaimed(c, p1), await reclaimed(c, p2)],
          kvm: await kvmTable(c, vm),
          mdev: await vdcmView(c, m),
          device: await iommuEntries(c, device),
          stage2: await domainExists(c, stage2),
          container: await containerOf(c, vm.containerId),
        }),
        (x) =>
          !x.set &&
          x.reclaimed.every((r) => r) &&
          x.kvm.length === 0 &&
          x.mdev.setId === 0 &&
          x.mdev.entries.length === 0 &&
          x.device.length === 0 &&
          !x.stage2 &&
          x.container === undefined,
        "the container of the life before the crash closed: set destroyed, IOASIDs reclaimed, entries gone, devices given back, stage 2 freed",
      );
      await eventually(
        async () =>
          (await c.h.history(since - 1, "vfio")).flatMap((r) =>
            r.action.$case === "containerClose" && r.action.value.container === vm.containerId ? [r.action.value.reason] : [],
          ),
        (reasons) => reasons.includes("SERVICE_RESTARTED"),
        "a container_close record with reason SERVICE_RESTARTED",
      );
    },
  }),
  clause({
    id: "vfio.restart.serves-again",
    statement:
      "after a restart VFIO hands out container ids it never used before, and its fault relay works again (it re-opened its fault stream at the IOMMU): a new guest's fault group reaches its watcher",
    source: "DESIGN §12 (restart: resubscribe); vfio.proto (container ids), WatchFaults",
    needs: ["restart"],
    async run(c) {
      const before = await openVm(c);
      const used = c.maxContainerId;
      await c.h.restartTarget();
      const g = await faultingGuest(c);
      expectThat(g.vm.containerId > used, `a container id above ${used} (every id handed out before the restart)`, g.vm.containerId, "the new container's id");
      expectThat(g.vm.containerId !== before.containerId, "an id not reused", g.vm.containerId);
      const seen = await c.iommu.queryState(P(iommu.QueryStateRequest, { deviceIds: [g.device] }));
      const state = seen.faultGroups.find((x) => x.faultGroupId === g.group.faultGroupId)?.state;
      expectEqual(state, iommu.FaultGroupState.FAULT_GROUP_STATE_PENDING, "the relayed group at the IOMMU (waiting for the VMM)");
    },
  }),
];

/**
 * The VFIO role's contract (DESIGN §5 "VFIO", §3, vfio.proto). VFIO subscribes to no events: its
 * "event" clauses are about its effects (a free, a session's end and a close drive the FREEs through
 * the tiers, which the kit watches by playing a tier itself).
 *
 * Authority: DESIGN §3 makes a VMM's session its capability: OpenContainer answers the container's
 * capability, and every call naming the container must carry it (metadata `ioasid-vfio-capability`);
 * without it, or with another container's, the call is PERMISSION_DENIED and changes nothing (the
 * `vfio.capability.*` clauses). The isolation clauses check the other half: a call naming one
 * container, with its capability, never reaches another VM's PASIDs, devices or fault groups
 * (IOASID_NOT_IN_SET, DEVICE_BUSY / DEVICE_NOT_ASSIGNED, FAULT_GROUP_NOT_GIVEN).
 */
export const vfioSuite: RoleSuite<VfioCtx> = {
  role: "vfio",
  summary: "the VMM-facing API: one container per VM (its IOASID set), devices and mdevs, guest PASIDs and binds, fault relay; it holds no IOASID references",
  target:
    "ioasid.vfio.v1.VfioService and grpc.health.v1 at --target; the core at IOASID_CORE_ADDRESS, the IOMMU at IOMMU_ADDRESS, VDCM at VDCM_ADDRESS, KVM at KVM_ADDRESS; NATS at NATS_URL",
  prepare: (h) => ({
    h,
    vfio: createVfioSession(createClient(vfio.VfioServiceService, h.target, { deadlineMs: 10_000 })),
    stranger: createClient(vfio.VfioServiceService, h.target, { deadlineMs: 10_000 }),
    iommu: createClient(iommu.IommuServiceService, h.addresses.iommu!, { deadlineMs: 10_000 }),
    vdcm: createClient(vdcm.VdcmServiceService, h.addresses.vdcm!, { deadlineMs: 10_000 }),
    kvm: createClient(kvm.KvmServiceService, h.addresses.kvm!, { deadlineMs: 10_000 }),
    opened: [],
    tiers: [],
    watches: [],
    maxContainerId: 0,
    nextGroup: 1000,
  }),
  clauses,
  close: async (c) => {
    await cleanup(c);
    c.vfio.close();
    c.stranger.close();
    c.iommu.close();
    c.vdcm.close();
    c.kvm.close();
  },
};

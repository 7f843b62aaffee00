import { Code } from "@ioasid/errors";
import { createClient } from "@ioasid/grpc-kit";
import { bus, core, events, iommu } from "@ioasid/proto";
import { eventually, expectEqual, expectRefused, expectRefusedUnchanged, expectThat, show, type Clause } from "../clause.js";
import type { RoleSuite } from "../suite.js";
import { alloc, createMmSet, eventOf, free, referencesOf, stateOf } from "./core-steps.js";
import {
  type IommuCtx,
  P,
  GPA,
  HPA,
  GVA,
  PAGE,
  RW,
  NO_ID,
  FAULT_PASID,
  newDevice,
  newDomain,
  newVm,
  bindRequest,
  unbindRequest,
  boundPasid,
  freePending,
  takeKitReference,
  putKitReference,
  unallocated,
  query,
  entriesAt,
  flushedAt,
  tables,
  coreView,
  spidOf,
  iommuInstance,
  lastSeq,
  eventsSince,
  reclaimed,
  freeAndAck,
  dma,
  faultTarget,
  type FaultStream,
  openStream,
  attachedStream,
  attachedStreamAtBind,
  pendingGroup,
  settledLater,
  respond,
  expectStreamRefused,
} from "./iommu-steps.js";

export type { IommuCtx } from "./iommu-steps.js";

const { EventType, Priority } = events;
const { DomainType, AttachKind, TranslateOutcome, FaultReason, PageResponseCode, PageResponseSource, IotlbFlushCause, FaultGroupState } = iommu;

const clauses: Clause<IommuCtx>[] = [
  {
    id: "iommu.registration.global-iommu-free",
    statement: "the IOMMU is registered with the core once, globally, at IOMMU priority, for FREE events",
    source: "DESIGN §1 (iommu: IOMMU tier, global scope), §5 IOMMU; iommu.proto IommuService",
    async run(c) {
      const regs = (await c.h.core.listRegistrations({})).registrations.filter((r) => r.subscriber?.name === "iommu");
      expectEqual(
        regs.map((r) => ({
          scope: r.scope?.$case,
          priority: events.priorityToJSON(r.priority),
          active: r.active,
          free: r.events.length === 0 || r.events.includes(EventType.EVENT_TYPE_FREE),
        })),
        [{ scope: "global", priority: "PRIORITY_IOMMU", active: true, free: true }],
        'the core\'s registrations of subscriber "iommu"',
      );
    },
  },
  {
    id: "iommu.rpc.register-device",
    statement:
      "RegisterDevice plugs a PF or a VF in with an empty PASID table; a duplicate, a VF of no PF, max_pasids above 2^20 or no function are refused and change nothing",
    source: "DESIGN §5 IOMMU (devices); iommu.proto RegisterDevice",
    async run(c) {
      const pf = c.h.uniqueName("pf");
      const vf = c.h.uniqueName("vf");
      const got = (
        await c.iommu.registerDevice(
          P(iommu.RegisterDeviceRequest, {
            deviceId: pf,
            maxPasids: 1 << 20,
            priCapable: true,
            function: iommu.DeviceFunction.DEVICE_FUNCTION_PF,
            iommuGroup: 3,
          }),
        )
      ).device!;
      expectEqual(
        { id: got.deviceId, max: got.maxPasids, pri: got.priCapable, group: got.iommuGroup, entries: got.pasidEntries, credits: got.priCredits > 0 },
        { id: pf, max: 1 << 20, pri: true, group: 3, entries: [], credits: true },
        "the registered PF (empty PASID table, effective credits)",
      );
      await c.iommu.registerDevice(
        P(iommu.RegisterDeviceRequest, {
          deviceId: vf,
          maxPasids: 64,
          function: iommu.DeviceFunction.DEVICE_FUNCTION_VF,
          parentDeviceId: pf,
          iommuGroup: 3,
          priCredits: 4,
        }),
      );
      const s = await query(c, [pf, vf]);
      expectEqual(
        s.devices.map((d) => ({ id: d.deviceId, parent: d.parentDeviceId, credits: d.priCredits, entries: d.pasidEntries.length })),
        [
          { id: pf, parent: "", credits: got.priCredits, entries: 0 },
          { id: vf, parent: pf, credits: 4, entries: 0 },
        ].sort((a, b) => (a.id < b.id ? -1 : 1)),
        "QueryState of the PF and its VF",
      );
      const allDevices = async () => (await query(c, [])).devices.map((d) => d.deviceId);
      const refusals: Array<[iommu.RegisterDeviceRequest, Code, string]> = [
        [
          P(iommu.RegisterDeviceRequest, { deviceId: pf, maxPasids: 8, function: iommu.DeviceFunction.DEVICE_FUNCTION_PF }),
          Code.ALREADY_EXISTS,
          "DEVICE_EXISTS",
        ],
        [
          P(iommu.RegisterDeviceRequest, {
            deviceId: c.h.uniqueName("vf"),
            function: iommu.DeviceFunction.DEVICE_FUNCTION_VF,
            parentDeviceId: c.h.uniqueName("none"),
          }),
          Code.NOT_FOUND,
          "DEVICE_NOT_FOUND",
        ],
        [
          P(iommu.RegisterDeviceRequest, { deviceId: c.h.uniqueName("big"), maxPasids: (1 << 20) + 1, function: iommu.DeviceFunction.DEVICE_FUNCTION_PF }),
          Code.INVALID_ARGUMENT,
          "PASID_OUT_OF_RANGE",
        ],
        [P(iommu.RegisterDeviceRequest, { deviceId: c.h.uniqueName("nofn"), maxPasids: 8 }), Code.INVALID_ARGUMENT, "INVALID_FIELD"],
        [
          P(iommu.RegisterDeviceRequest, { deviceId: "", maxPasids: 8, function: iommu.DeviceFunction.DEVICE_FUNCTION_PF }),
          Code.INVALID_ARGUMENT,
          "INVALID_FIELD",
        ],
      ];
      for (const [req, code, reason] of refusals) {
        await expectRefusedUnchanged(
          async () => ({ all: await allDevices(), mine: await tables(c, [pf, vf]) }),
          () => c.iommu.registerDevice(req),
          code,
          reason,
          `RegisterDevice ${show(req.deviceId)}`,
        );
      }
    },
  },
  {
    id: "iommu.rpc.remove-device",
    statement:
      "RemoveDevice tears down every handle (flush DEVICE_REMOVED), answers its fault groups INVALID, releases its binds' references and forgets the device; an unknown device or a PF with a VF is refused and changes nothing",
    source: "iommu.proto RemoveDevice; DESIGN §5 IOMMU (device removal answers INVALID)",
    async run(c) {
      const v = await newVm(c, 1);
      const [d] = v.devices as [string];
      const a = await boundPasid(c, v, 41);
      const t = await faultTarget(c, v.owner, d);
      const s = await attachedStream(c, t);
      try {
        const g = await pendingGroup(c, t, s, GVA);
        const r = await c.iommu.removeDevice({ deviceId: d });
        expectEqual(
          { handles: r.detachedHandles, groups: r.answeredFaultGroups },
          { handles: 3, groups: 1 },
          "RemoveDevice's answer (stage 2, bind, PASID attach)",
        );
        await expectRefused(query(c, [d]), Code.NOT_FOUND, "DEVICE_NOT_FOUND", "QueryState of the removed device");
        const flushes = (await query(c, [], 1024)).iotlbFlushes.filter((f) => f.deviceId === d && f.cause === IotlbFlushCause.IOTLB_FLUSH_CAUSE_DEVICE_REMOVED);
        expectEqual(flushes.length, 3, "DEVICE_REMOVED flushes of the device");
        await eventually(
          async () => s.answered(g).map((x) => [iommu.pageResponseCodeToJSON(x.responseCode), iommu.pageResponseSourceToJSON(x.responseSource)]),
          (x) => x.length > 0,
          "the group's answer on the owner's stream",
        ).then((x) => expectEqual(x, [["PAGE_RESPONSE_CODE_INVALID", "PAGE_RESPONSE_SOURCE_DEVICE_REMOVED"]], "the device's fault group answered"));
        expectEqual(await referencesOf(c.h, a.ioasid, "iommu"), 0, "the IOMMU's references on the IOASID bound only on the removed device");
      } finally {
        s.stop();
      }
      const pf = await newDevice(c);
      const vf = c.h.uniqueName("vf");
      await c.iommu.registerDevice(
        P(iommu.RegisterDeviceRequest, { deviceId: vf, maxPasids: 8, function: iommu.DeviceFunction.DEVICE_FUNCTION_VF, parentDeviceId: pf }),
      );
      await expectRefusedUnchanged(
        () => tables(c, [pf, vf]),
        () => c.iommu.removeDevice({ deviceId: pf }),
        Code.FAILED_PRECONDITION,
        "DEVICE_IN_USE",
        "RemoveDevice of a PF with a VF",
      );
      await expectRefusedUnchanged(
        async () => (await query(c, [])).devices.map((x) => x.deviceId),
        () => c.iommu.removeDevice({ deviceId: c.h.uniqueName("none") }),
        Code.NOT_FOUND,
        "DEVICE_NOT_FOUND",
        "RemoveDevice of an unknown device",
      );
    },
  },
  {
    id: "iommu.rpc.create-domain",
    statement:
      "CreateDomain makes an unattached PAGING, SVA or NESTED domain; no type, a missing parent or a parent that is not PAGING are refused and change nothing",
    source: "DESIGN §5 IOMMU (domains: paging, SVA, nested); iommu.proto CreateDomain",
    async run(c) {
      const paging = (await c.iommu.createDomain(P(iommu.CreateDomainRequest, { type: DomainType.DOMAIN_TYPE_PAGING }))).domain!;
      const mm = c.h.uniqueToken();
      const sva = (await c.iommu.createDomain(P(iommu.CreateDomainRequest, { type: DomainType.DOMAIN_TYPE_SVA, mmToken: mm }))).domain!;
      const nested = (
        await c.iommu.createDomain(
          P(iommu.CreateDomainRequest, { type: DomainType.DOMAIN_TYPE_NESTED, parentDomainId: paging.domainId, guestPgtable: 0x9000n }),
        )
      ).domain!;
      expectEqual(
        [paging, sva, nested].map((d) => ({ type: d.type, parent: d.parentDomainId, mm: d.mmToken, pgtable: d.guestPgtable, attached: d.attachCount })),
        [
          { type: DomainType.DOMAIN_TYPE_PAGING, parent: 0, mm: 0n, pgtable: 0n, attached: 0 },
          { type: DomainType.DOMAIN_TYPE_SVA, parent: 0, mm, pgtable: 0n, attached: 0 },
          { type: DomainType.DOMAIN_TYPE_NESTED, parent: paging.domainId, mm: 0n, pgtable: 0x9000n, attached: 0 },
        ],
        "the created domains",
      );
      const listed = (await query(c, [])).domains.filter((d) => [paging.domainId, sva.domainId, nested.domainId].includes(d.domainId));
      expectEqual(listed.length, 3, "the created domains in QueryState");
      // Domains made from here on would have higher ids: none may appear.
      const newer = async () => (await query(c, [])).domains.filter((d) => d.domainId > nested.domainId).map((d) => d.domainId);
      const refusals: Array<[object, Code, string]> = [
        [{}, Code.INVALID_ARGUMENT, "INVALID_FIELD"],
        [{ type: DomainType.DOMAIN_TYPE_NESTED, parentDomainId: NO_ID, guestPgtable: 0x9000n }, Code.NOT_FOUND, "DOMAIN_NOT_FOUND"],
        [{ type: DomainType.DOMAIN_TYPE_NESTED, parentDomainId: sva.domainId, guestPgtable: 0x9000n }, Code.FAILED_PRECONDITION, "DOMAIN_NOT_PAGING"],
      ];
      for (const [req, code, reason] of refusals) {
        await expectRefusedUnchanged(newer, () => c.iommu.createDomain(P(iommu.CreateDomainRequest, req)), code, reason, `CreateDomain ${show(req)}`);
      }
    },
  },
  {
    id: "iommu.rpc.free-domain",
    statement: "FreeDomain destroys an unused domain; an unknown domain, an attached one or the parent of a nested one is refused and changes nothing",
    source: "iommu.proto FreeDomain",
    async run(c) {
      const lone = await newDomain(c, DomainType.DOMAIN_TYPE_PAGING);
      await c.iommu.freeDomain({ domainId: lone });
      expectEqual((await query(c, [])).domains.filter((d) => d.domainId === lone).length, 0, "the freed domain in QueryState");
      const v = await newVm(c, 1);
      const parent = await newDomain(c, DomainType.DOMAIN_TYPE_PAGING);
      const nested = await newDomain(c, DomainType.DOMAIN_TYPE_NESTED, { parentDomainId: parent, guestPgtable: 0x9000n });
      const refusals: Array<[number, Code, string]> = [
        [lone, Code.NOT_FOUND, "DOMAIN_NOT_FOUND"],
        [v.stage2, Code.FAILED_PRECONDITION, "DOMAIN_IN_USE"],
        [parent, Code.FAILED_PRECONDITION, "DOMAIN_IN_USE"],
      ];
      for (const [domainId, code, reason] of refusals) {
        await expectRefusedUnchanged(
          () => tables(c, v.devices, [parent, nested]),
          () => c.iommu.freeDomain({ domainId }),
          code,
          reason,
          `FreeDomain ${domainId}`,
        );
      }
    },
  },
  {
    id: "iommu.rpc.attach-domain",
    statement:
      "AttachDomain programs a PASID (or the RID_PASID entry) with the domain and returns the handle with the owner's data; PASID 0, a PASID out of range or taken, an SVA domain, an unknown device or domain are refused and change nothing",
    source: "DESIGN §5 IOMMU (attach handles; a taken PASID is FAILED_PRECONDITION; PASID 0 is never a PASID target); iommu.proto AttachDomain",
    async run(c) {
      const d = await newDevice(c, { maxPasids: 64 });
      const dom = await newDomain(c, DomainType.DOMAIN_TYPE_PAGING);
      const other = await newDomain(c, DomainType.DOMAIN_TYPE_PAGING);
      const sva = await newDomain(c, DomainType.DOMAIN_TYPE_SVA, { mmToken: c.h.uniqueToken() });
      const owner = c.h.uniqueName("owner");
      const attach = (extra: object) => c.iommu.attachDomain(P(iommu.AttachDomainRequest, { domainId: dom, deviceId: d, owner, ...extra }));
      const h = (await attach({ pasid: 5, ownerData: Buffer.from([1, 2, 3]) })).handle!;
      expectEqual(
        { kind: h.kind, pasid: h.pasid, rid: h.withoutPasid, domain: h.domainId, owner: h.owner, data: [...h.ownerData], gen: h.generation },
        { kind: AttachKind.ATTACH_KIND_DOMAIN, pasid: 5, rid: false, domain: dom, owner, data: [1, 2, 3], gen: 0 },
        "the PASID attach handle",
      );
      const rid = (await attach({ withoutPasid: true })).handle!;
      const entries = (await query(c, [d])).devices[0]!.pasidEntries.map((e) => ({
        pasid: e.pasid,
        rid: e.withoutPasid,
        domain: e.domainId,
        handle: e.handleId,
      }));
      expectEqual(
        entries.sort((x, y) => Number(x.handle - y.handle)),
        [
          { pasid: 5, rid: false, domain: dom, handle: h.handleId },
          { pasid: 0, rid: true, domain: dom, handle: rid.handleId },
        ],
        "the device's PASID table",
      );
      const refusals: Array<[object, Code, string]> = [
        [{ pasid: 0 }, Code.INVALID_ARGUMENT, "PASID_ZERO_RESERVED"],
        [{ pasid: 64 }, Code.INVALID_ARGUMENT, "PASID_OUT_OF_RANGE"],
        [{ pasid: 5, domainId: other }, Code.FAILED_PRECONDITION, "PASID_IN_USE"],
        [{ withoutPasid: true, domainId: other }, Code.FAILED_PRECONDITION, "PASID_IN_USE"],
        [{ pasid: 6, domainId: sva }, Code.FAILED_PRECONDITION, "DOMAIN_INCOMPATIBLE"],
        [{ pasid: 6, deviceId: c.h.uniqueName("none") }, Code.NOT_FOUND, "DEVICE_NOT_FOUND"],
        [{ pasid: 6, domainId: NO_ID }, Code.NOT_FOUND, "DOMAIN_NOT_FOUND"],
        [{ pasid: 6, owner: "" }, Code.INVALID_ARGUMENT, "INVALID_FIELD"],
      ];
      for (const [extra, code, reason] of refusals) {
        await expectRefusedUnchanged(
          () => tables(c, [d], [dom, other, sva]),
          () => attach(extra),
          code,
          reason,
          `AttachDomain ${show(extra)}`,
        );
      }
    },
  },
  {
    id: "iommu.rpc.attach-domain.ioasid",
    statement:
      "an AttachDomain with a generation belongs to that IOASID (its FREE tears it down, an unchecked one stays); a stale generation, an unallocated or a FREE_PENDING IOASID is refused and changes nothing",
    source: "iommu.proto AttachDomain (STALE_GENERATION, IOASID_NOT_FOUND, IOASID_FREE_PENDING); DESIGN §3 generations",
    async run(c) {
      const setId = await createMmSet(c.h, c.h.uniqueToken());
      const d = await newDevice(c);
      const dom = await newDomain(c, DomainType.DOMAIN_TYPE_PAGING);
      const owner = c.h.uniqueName("owner");
      const attach = (pasid: number, generation: number) =>
        c.iommu.attachDomain(P(iommu.AttachDomainRequest, { domainId: dom, deviceId: d, pasid, generation, owner }));
      const checked = await alloc(c.h, setId);
      const unchecked = await alloc(c.h, setId);
      const h = (await attach(checked.ioasid, checked.generation)).handle!;
      expectEqual(h.generation, checked.generation, "the handle's generation");
      await attach(unchecked.ioasid, 0);
      const pending = await freePending(c, setId);
      const fresh = await alloc(c.h, setId);
      // Last: the allocator hands out the lowest free IOASID, so a later alloc would take this one again.
      const gone = await unallocated(c, setId);
      const refusals: Array<[number, number, Code, string]> = [
        [fresh.ioasid, fresh.generation + 1, Code.FAILED_PRECONDITION, "STALE_GENERATION"],
        [gone.ioasid, gone.generation, Code.NOT_FOUND, "IOASID_NOT_FOUND"],
        [pending.ioasid, pending.generation, Code.NOT_FOUND, "IOASID_FREE_PENDING"],
      ];
      for (const [pasid, generation, code, reason] of refusals) {
        await expectRefusedUnchanged(
          () => tables(c, [d], [dom]),
          () => attach(pasid, generation),
          code,
          reason,
          `AttachDomain at ${pasid} generation ${generation}`,
        );
      }
      await putKitReference(c, setId, pending);
      // Both IOASIDs freed: only the attachment made with a generation is the IOASID's.
      await takeKitReference(c, setId, checked);
      await free(c.h, setId, checked.ioasid, checked.generation);
      await free(c.h, setId, unchecked.ioasid, unchecked.generation);
      await eventually(
        () => entriesAt(c, [d], checked.ioasid),
        (e) => e.length === 0,
        "the checked attachment torn down by its IOASID's FREE",
      );
      expectEqual(await flushedAt(c, [d], checked.ioasid, IotlbFlushCause.IOTLB_FLUSH_CAUSE_IOASID_FREE), [d], "the FREE's flush of the checked attachment");
      expectEqual(await entriesAt(c, [d], unchecked.ioasid), [d], "the unchecked attachment after its IOASID's free");
      await putKitReference(c, setId, checked);
    },
  },
  {
    id: "iommu.rpc.detach-domain",
    statement:
      "DetachDomain tears the entry down, flushes (DETACH) and answers the handle's fault groups INVALID; nothing attached, another domain, a bind's handle, an unknown device or a stale generation are refused and change nothing",
    source: "iommu.proto DetachDomain; DESIGN §5 IOMMU (detach answers INVALID)",
    async run(c) {
      const v = await newVm(c, 1);
      const [d] = v.devices as [string];
      const a = await boundPasid(c, v, 42);
      const t = await faultTarget(c, v.owner, d, FAULT_PASID + 1);
      const s = await attachedStream(c, t);
      try {
        const g = await pendingGroup(c, t, s, GVA);
        const waiting = settledLater(c.iommu.awaitPageResponse({ deviceId: d, faultGroupId: g }));
        const r = await c.iommu.detachDomain(P(iommu.DetachDomainRequest, { domainId: t.domainId, deviceId: d, pasid: t.pasid }));
        expectEqual(r.answeredFaultGroups, 1, "DetachDomain's answered_fault_groups");
        expectEqual(
          await waiting,
          { code: PageResponseCode.PAGE_RESPONSE_CODE_INVALID, source: PageResponseSource.PAGE_RESPONSE_SOURCE_DETACH },
          "the group's response",
        );
        expectEqual(await entriesAt(c, [d], t.pasid), [], "the entry after DetachDomain");
        expectEqual(await flushedAt(c, [d], t.pasid, IotlbFlushCause.IOTLB_FLUSH_CAUSE_DETACH), [d], "the DETACH flush");
      } finally {
        s.stop();
      }
      const setId = v.setId;
      const g1 = await alloc(c.h, setId);
      await c.iommu.attachDomain(
        P(iommu.AttachDomainRequest, { domainId: t.domainId, deviceId: d, pasid: g1.ioasid, generation: g1.generation, owner: v.owner }),
      );
      const detach = (extra: object) => c.iommu.detachDomain(P(iommu.DetachDomainRequest, { domainId: t.domainId, deviceId: d, ...extra }));
      const refusals: Array<[object, Code, string]> = [
        [{ pasid: t.pasid }, Code.NOT_FOUND, "ATTACH_HANDLE_NOT_FOUND"],
        [{ pasid: g1.ioasid, domainId: v.stage2 }, Code.FAILED_PRECONDITION, "DOMAIN_MISMATCH"],
        [{ pasid: a.ioasid }, Code.FAILED_PRECONDITION, "DOMAIN_MISMATCH"],
        [{ pasid: g1.ioasid, deviceId: c.h.uniqueName("none") }, Code.NOT_FOUND, "DEVICE_NOT_FOUND"],
        [{ pasid: g1.ioasid, generation: g1.generation + 1 }, Code.FAILED_PRECONDITION, "STALE_GENERATION"],
      ];
      for (const [extra, code, reason] of refusals) {
        await expectRefusedUnchanged(
          () => tables(c, [d]),
          () => detach(extra),
          code,
          reason,
          `DetachDomain ${show(extra)}`,
        );
      }
      await detach({ pasid: g1.ioasid, generation: g1.generation });
      await c.iommu.detachDomain(P(iommu.DetachDomainRequest, { domainId: v.stage2, deviceId: d, withoutPasid: true }));
      expectEqual((await query(c, [d])).devices[0]!.pasidEntries.filter((e) => e.withoutPasid).length, 0, "the RID_PASID entry after its detach");
    },
  },
  {
    id: "iommu.rpc.replace-domain",
    statement:
      "ReplaceDomain moves an attachment to another domain in one step: the entry follows the new domain under a new handle, the old domain is flushed (REPLACE) and the old handle's fault groups answered INVALID (REPLACE); attach still never overwrites; an unattached target (INVALID_ARGUMENT PASID_NOT_ATTACHED), a bind's handle, the wrong old domain or a stale generation are refused and change nothing",
    source: "iommu.proto ReplaceDomain; DESIGN §5 iommufd model (replace); issue 16 item 1",
    async run(c) {
      const v = await newVm(c, 1);
      const [d] = v.devices as [string];
      const a = await boundPasid(c, v, 43);
      const t = await faultTarget(c, v.owner, d, FAULT_PASID + 2);
      const next = await newDomain(c, DomainType.DOMAIN_TYPE_PAGING);
      const s = await attachedStream(c, t);
      try {
        const g = await pendingGroup(c, t, s, GVA);
        const waiting = settledLater(c.iommu.awaitPageResponse({ deviceId: d, faultGroupId: g }));
        const r = await c.iommu.replaceDomain(
          P(iommu.ReplaceDomainRequest, { domainId: next, deviceId: d, pasid: t.pasid, owner: v.owner, oldDomainId: t.domainId }),
        );
        expectEqual([r.replacedDomainId, r.answeredFaultGroups, r.handle?.domainId], [t.domainId, 1, next], "ReplaceDomain's answer");
        expectEqual(
          await waiting,
          { code: PageResponseCode.PAGE_RESPONSE_CODE_INVALID, source: PageResponseSource.PAGE_RESPONSE_SOURCE_REPLACE },
          "the old attachment's group's response",
        );
        const entry = (await query(c, [d])).devices[0]!.pasidEntries.find((e) => e.pasid === t.pasid && !e.withoutPasid);
        expectEqual([entry?.domainId, entry?.handleId], [next, r.handle?.handleId], "the entry after ReplaceDomain");
        expectEqual(await flushedAt(c, [d], t.pasid, IotlbFlushCause.IOTLB_FLUSH_CAUSE_REPLACE), [d], "the REPLACE flush of the old domain");
      } finally {
        s.stop();
      }
      const replace = (extra: object) =>
        c.iommu.replaceDomain(P(iommu.ReplaceDomainRequest, { domainId: t.domainId, deviceId: d, pasid: t.pasid, owner: v.owner, ...extra }));
      const refusals: Array<[() => Promise<unknown>, Code, string, string]> = [
        [() => replace({ pasid: t.pasid + 1 }), Code.INVALID_ARGUMENT, "PASID_NOT_ATTACHED", "ReplaceDomain of an unattached PASID"],
        [() => replace({ pasid: a.ioasid }), Code.FAILED_PRECONDITION, "DOMAIN_MISMATCH", "ReplaceDomain of a guest bind's entry"],
        [() => replace({ oldDomainId: t.domainId }), Code.FAILED_PRECONDITION, "DOMAIN_MISMATCH", "ReplaceDomain naming the wrong old domain"],
        [
          () => c.iommu.attachDomain(P(iommu.AttachDomainRequest, { domainId: t.domainId, deviceId: d, pasid: t.pasid, owner: v.owner })),
          Code.FAILED_PRECONDITION,
          "PASID_IN_USE",
          "AttachDomain over an attachment (attach never overwrites)",
        ],
      ];
      for (const [call, code, reason, what] of refusals) await expectRefusedUnchanged(() => tables(c, [d]), call, code, reason, what);
      const g1 = await alloc(c.h, v.setId);
      await c.iommu.attachDomain(P(iommu.AttachDomainRequest, { domainId: next, deviceId: d, pasid: g1.ioasid, generation: g1.generation, owner: v.owner }));
      await expectRefusedUnchanged(
        () => tables(c, [d]),
        () => replace({ pasid: g1.ioasid, generation: g1.generation + 1 }),
        Code.FAILED_PRECONDITION,
        "STALE_GENERATION",
        "ReplaceDomain with a stale generation",
      );
      const back = await replace({ pasid: g1.ioasid, generation: g1.generation });
      expectEqual(back.handle?.generation, g1.generation, "the replaced attachment stays the IOASID's");
      await c.iommu.detachDomain(P(iommu.DetachDomainRequest, { domainId: t.domainId, deviceId: d, pasid: g1.ioasid, generation: g1.generation }));
    },
  },
  {
    id: "iommu.rpc.bind-gpasid",
    statement: "BindGpasid programs a NESTED entry per device; only the first device bind attaches the SPID (one BIND) and takes the IOMMU's one reference",
    source: "DESIGN §5 IOMMU (guest bind: ownership check, attach SPID — only the first bind emits BIND — take a reference); iommu.proto BindGpasid",
    async run(c) {
      const v = await newVm(c, 2);
      const [d0, d1] = v.devices as [string, string];
      const a = await alloc(c.h, v.setId);
      const from = await lastSeq(c.h);
      const first = await c.iommu.bindGpasid(bindRequest(v, a, d0, 101));
      expectEqual(
        {
          first: first.firstBind,
          kind: first.handle!.kind,
          pasid: first.handle!.pasid,
          gpasid: first.handle!.gpasid,
          set: first.handle!.setId,
          owner: first.handle!.owner,
        },
        { first: true, kind: AttachKind.ATTACH_KIND_GPASID_BIND, pasid: a.ioasid, gpasid: 101, set: v.setId, owner: v.owner },
        "the first device bind",
      );
      expectEqual(await eventsSince(c.h, from, a.ioasid), ["BIND"], "events after the first bind");
      expectEqual(await referencesOf(c.h, a.ioasid, "iommu"), 1, "the IOMMU's references after the first bind");
      expectEqual(await spidOf(c, a.ioasid), 101, "the IOASID's SPID");
      const second = await c.iommu.bindGpasid(bindRequest(v, a, d1, 101));
      expectEqual(second.firstBind, false, "first_bind of the second device's bind");
      expectEqual(await eventsSince(c.h, from, a.ioasid), ["BIND"], "events after the second device's bind");
      expectEqual(await referencesOf(c.h, a.ioasid, "iommu"), 1, "the IOMMU's references after the second device's bind");
      const entries = (await query(c, v.devices)).devices.flatMap((d) =>
        d.pasidEntries
          .filter((e) => e.pasid === a.ioasid && !e.withoutPasid)
          .map((e) => ({ device: d.deviceId, type: e.domainType, set: e.setId, gpasid: e.gpasid })),
      );
      expectEqual(
        entries,
        v.devices.map((device) => ({ device, type: DomainType.DOMAIN_TYPE_NESTED, set: v.setId, gpasid: 101 })),
        "the NESTED entries of the bind",
      );
    },
  },
  {
    id: "iommu.rpc.unbind-gpasid",
    statement:
      "UnbindGpasid tears one device's entry down (flush DETACH); only the last device unbind detaches the SPID (one UNBIND); the IOMMU keeps its reference for the FREE",
    source: "DESIGN §5 IOMMU (only the last unbind emits UNBIND); iommu.proto UnbindGpasid",
    async run(c) {
      const v = await newVm(c, 2);
      const [d0, d1] = v.devices as [string, string];
      const a = await boundPasid(c, v, 102);
      const from = await lastSeq(c.h);
      const one = await c.iommu.unbindGpasid(unbindRequest(v, a, d0, 102));
      expectEqual({ unbound: one.unbound, last: one.lastUnbind }, { unbound: true, last: false }, "the first device's unbind");
      expectEqual(await eventsSince(c.h, from, a.ioasid), [], "events after the first device's unbind");
      expectEqual(await entriesAt(c, v.devices, a.ioasid), [d1], "devices with an entry after the first unbind");
      expectEqual(await spidOf(c, a.ioasid), 102, "the SPID after the first device's unbind");
      const last = await c.iommu.unbindGpasid(unbindRequest(v, a, d1, 102));
      expectEqual({ unbound: last.unbound, last: last.lastUnbind }, { unbound: true, last: true }, "the last device's unbind");
      expectEqual(await eventsSince(c.h, from, a.ioasid), ["UNBIND"], "events after the last unbind");
      expectEqual(await spidOf(c, a.ioasid), 0, "the SPID after the last unbind");
      expectEqual(await entriesAt(c, v.devices, a.ioasid), [], "devices with an entry after the last unbind");
      expectEqual(await flushedAt(c, v.devices, a.ioasid, IotlbFlushCause.IOTLB_FLUSH_CAUSE_DETACH), v.devices, "DETACH flushes of the unbinds");
      expectEqual(await referencesOf(c.h, a.ioasid, "iommu"), 1, "the IOMMU's references after the last unbind (kept until the FREE)");
    },
  },
  {
    id: "iommu.rpc.bind-gpasid.refused-other-set",
    statement: "BindGpasid naming an IOASID of another set is PERMISSION_DENIED IOASID_NOT_IN_SET, bound by its owner or not, and changes nothing",
    source: "DESIGN §3 ownership, §5 IOMMU (guest bind: ownership check), §7 S3; iommu.proto BindGpasid",
    async run(c) {
      const owner = await newVm(c, 1);
      const intruder = await newVm(c, 1);
      const bound = await boundPasid(c, owner, 103);
      const unbound = await alloc(c.h, owner.setId);
      const from = await lastSeq(c.h);
      const devices = [...owner.devices, ...intruder.devices];
      for (const [a, what] of [
        [bound, "an IOASID its owner has bound"],
        [unbound, "an IOASID its owner has not bound"],
      ] as const) {
        await expectRefusedUnchanged(
          async () => ({ tables: await tables(c, devices), core: await coreView(c, [bound.ioasid, unbound.ioasid]) }),
          () => c.iommu.bindGpasid(bindRequest(intruder, { ioasid: a.ioasid, generation: 0 }, intruder.devices[0]!, 103)),
          Code.PERMISSION_DENIED,
          "IOASID_NOT_IN_SET",
          `BindGpasid by another set of ${what}`,
        );
      }
      expectEqual([await eventsSince(c.h, from, bound.ioasid), await eventsSince(c.h, from, unbound.ioasid)], [[], []], "events of the owner's IOASIDs");
    },
  },
  {
    id: "iommu.rpc.bind-gpasid.refused-not-a-vm",
    statement:
      "BindGpasid of a host process's SVA PASID, named with its own (NONE-token) set, is PERMISSION_DENIED SET_NOT_A_VM and changes nothing: a guest page table never lands on a host PASID",
    source: "DESIGN §5 IOMMU (guest bind: ownership check); iommu.proto BindGpasid; issue 16 (the kernel's ownership check)",
    async run(c) {
      const v = await newVm(c, 1);
      const host = await newDevice(c);
      const mm = c.h.uniqueToken();
      const bond = (await c.iommu.svaBind(P(iommu.SvaBindRequest, { deviceId: host, mmToken: mm, owner: c.h.uniqueName("sva") }))).bond!;
      const info = (await c.h.core.describe({ ioasid: bond.pasid })).info!;
      const from = await lastSeq(c.h);
      const devices = [...v.devices, host];
      await expectRefusedUnchanged(
        async () => ({ tables: await tables(c, devices), core: await coreView(c, [bond.pasid]) }),
        () => c.iommu.bindGpasid(bindRequest({ ...v, setId: info.setId }, { ioasid: bond.pasid, generation: info.generation }, v.devices[0]!, 105)),
        Code.PERMISSION_DENIED,
        "SET_NOT_A_VM",
        "BindGpasid of a host SVA PASID with its own set",
      );
      expectEqual(await eventsSince(c.h, from, bond.pasid), [], "events of the SVA PASID");
      await c.iommu.releaseMm(P(iommu.ReleaseMmRequest, { mmToken: mm }));
    },
  },
  {
    id: "iommu.rpc.bind-gpasid.refused",
    statement:
      "BindGpasid with a stale generation, an unallocated or FREE_PENDING IOASID, an unknown device or parent, a parent not PAGING, another SPID, a taken PASID, a SPID in use, PASID 0, a PASID out of range or a missing field is refused and changes nothing",
    source: "iommu.proto BindGpasid (errors)",
    async run(c) {
      const v = await newVm(c, 2);
      const [d0, d1] = v.devices as [string, string];
      const bound = await boundPasid(c, v, 104, [d0]);
      const fresh = await alloc(c.h, v.setId);
      const pending = await freePending(c, v.setId);
      const gone = await unallocated(c, v.setId);
      // A device whose PASIDs stop below `fresh`.
      const small = await newDevice(c, { maxPasids: fresh.ioasid });
      await c.iommu.attachDomain(P(iommu.AttachDomainRequest, { domainId: v.stage2, deviceId: small, withoutPasid: true, owner: v.owner }));
      const sva = await newDomain(c, DomainType.DOMAIN_TYPE_SVA, { mmToken: c.h.uniqueToken() });
      const refusals: Array<[iommu.BindGpasidRequest, Code, string]> = [
        [bindRequest(v, { ...fresh, generation: fresh.generation + 1 }, d0, 105), Code.FAILED_PRECONDITION, "STALE_GENERATION"],
        [bindRequest(v, gone, d0, 105), Code.NOT_FOUND, "IOASID_NOT_FOUND"],
        [bindRequest(v, pending, d0, 105), Code.NOT_FOUND, "IOASID_FREE_PENDING"],
        [bindRequest(v, fresh, c.h.uniqueName("none"), 105), Code.NOT_FOUND, "DEVICE_NOT_FOUND"],
        [bindRequest(v, fresh, d0, 105, { parentDomainId: NO_ID }), Code.NOT_FOUND, "DOMAIN_NOT_FOUND"],
        [bindRequest(v, fresh, d0, 105, { parentDomainId: sva }), Code.FAILED_PRECONDITION, "DOMAIN_NOT_PAGING"],
        [bindRequest(v, bound, d1, 106), Code.FAILED_PRECONDITION, "SPID_MISMATCH"],
        [bindRequest(v, bound, d0, 104), Code.FAILED_PRECONDITION, "PASID_IN_USE"],
        [bindRequest(v, fresh, d0, 104), Code.INVALID_ARGUMENT, "SPID_IN_USE"],
        [bindRequest(v, { ioasid: 0, generation: 0 }, d0, 105), Code.INVALID_ARGUMENT, "PASID_ZERO_RESERVED"],
        [bindRequest(v, fresh, small, 105), Code.INVALID_ARGUMENT, "PASID_OUT_OF_RANGE"],
        [bindRequest(v, fresh, d0, 0), Code.INVALID_ARGUMENT, "INVALID_FIELD"],
        [bindRequest(v, fresh, d0, 105, { owner: "" }), Code.INVALID_ARGUMENT, "INVALID_FIELD"],
        [bindRequest(v, fresh, d0, 105, { setId: 0 }), Code.INVALID_ARGUMENT, "INVALID_FIELD"],
      ];
      for (const [req, code, reason] of refusals) {
        await expectRefusedUnchanged(
          async () => ({ tables: await tables(c, [...v.devices, small]), core: await coreView(c, [bound.ioasid, fresh.ioasid, pending.ioasid]) }),
          () => c.iommu.bindGpasid(req),
          code,
          reason,
          `BindGpasid (expecting ${reason})`,
        );
      }
      await putKitReference(c, v.setId, pending);
    },
  },
  {
    id: "iommu.rpc.unbind-gpasid.refused",
    statement: "UnbindGpasid by another set, with a stale generation, another SPID, an unknown device, PASID 0 or no set is refused and changes nothing",
    source: "iommu.proto UnbindGpasid (errors); DESIGN §3 ownership",
    async run(c) {
      const v = await newVm(c, 1);
      const intruder = await newVm(c, 1);
      const [d] = v.devices as [string];
      const bound = await boundPasid(c, v, 107);
      const unbound = await alloc(c.h, v.setId);
      const refusals: Array<[iommu.UnbindGpasidRequest, Code, string]> = [
        [unbindRequest(intruder, { ioasid: bound.ioasid, generation: 0 }, d, 0), Code.PERMISSION_DENIED, "IOASID_NOT_IN_SET"],
        [unbindRequest(intruder, { ioasid: unbound.ioasid, generation: 0 }, d, 0), Code.PERMISSION_DENIED, "IOASID_NOT_IN_SET"],
        [unbindRequest(v, { ...bound, generation: bound.generation + 1 }, d, 107), Code.FAILED_PRECONDITION, "STALE_GENERATION"],
        [unbindRequest(v, bound, d, 108), Code.FAILED_PRECONDITION, "SPID_MISMATCH"],
        [unbindRequest(v, bound, c.h.uniqueName("none"), 107), Code.NOT_FOUND, "DEVICE_NOT_FOUND"],
        [unbindRequest(v, { ioasid: 0, generation: 0 }, d, 107), Code.INVALID_ARGUMENT, "PASID_ZERO_RESERVED"],
        [unbindRequest(v, bound, d, 107, { setId: 0 }), Code.INVALID_ARGUMENT, "INVALID_FIELD"],
      ];
      for (const [req, code, reason] of refusals) {
        await expectRefusedUnchanged(
          async () => ({ tables: await tables(c, [d, ...intruder.devices]), core: await coreView(c, [bound.ioasid, unbound.ioasid]) }),
          () => c.iommu.unbindGpasid(req),
          code,
          reason,
          `UnbindGpasid (expecting ${reason})`,
        );
      }
    },
  },
  {
    id: "iommu.rpc.sva",
    statement:
      "SvaBind gives an mm one PASID (in the mm's own NONE-token set) shared by every device it binds; SvaUnbind drops users and the last tears the entry down; the PASID is freed only by ReleaseMm",
    source: "DESIGN §5 IOMMU (native SVA: one PASID per mm, freed only when the mm goes away); iommu.proto SvaBind, SvaUnbind, ReleaseMm",
    async run(c) {
      const d0 = await newDevice(c);
      const d1 = await newDevice(c);
      const mm = c.h.uniqueToken();
      const owner = c.h.uniqueName("sva");
      const bind = (deviceId: string) => c.iommu.svaBind(P(iommu.SvaBindRequest, { deviceId, mmToken: mm, owner }));
      const a = await bind(d0);
      const pasid = a.bond!.pasid;
      expectEqual({ allocated: a.pasidAllocated, users: a.bond!.users }, { allocated: true, users: 1 }, "the mm's first bind");
      const b = await bind(d1);
      expectEqual(
        { allocated: b.pasidAllocated, pasid: b.bond!.pasid, domain: b.bond!.domainId },
        { allocated: false, pasid, domain: a.bond!.domainId },
        "a second device's bind of the mm",
      );
      expectEqual((await bind(d0)).bond!.users, 2, "users after binding (device 0, mm) again");
      const info = (await c.h.core.describe({ ioasid: pasid })).info!;
      const set = (await c.h.core.getSet(P(core.GetSetRequest, { setId: info.setId }))).set!;
      expectEqual(
        { state: info.state, tokenType: set.tokenType, token: set.token },
        { state: core.IoasidState.IOASID_STATE_ACTIVE, tokenType: events.TokenType.TOKEN_TYPE_NONE, token: mm },
        "the mm's PASID in the core (its set: token NONE = the mm token)",
      );
      const sva = (await query(c, [d0, d1])).devices.map((d) => d.pasidEntries.filter((e) => e.pasid === pasid).map((e) => e.domainType));
      expectEqual(sva, [[DomainType.DOMAIN_TYPE_SVA], [DomainType.DOMAIN_TYPE_SVA]], "the SVA entries of both devices");
      const unbind = async (deviceId: string) => (await c.iommu.svaUnbind(P(iommu.SvaUnbindRequest, { deviceId, mmToken: mm }))).remainingUsers;
      expectEqual([await unbind(d0), await unbind(d0), await unbind(d1)], [1, 0, 0], "users left after each SvaUnbind");
      expectEqual(await entriesAt(c, [d0, d1], pasid), [], "entries after the last SvaUnbind");
      expectEqual((await stateOf(c.h, pasid))?.state, core.IoasidState.IOASID_STATE_ACTIVE, "the mm's PASID after its last unbind");
      const again = await bind(d1);
      expectEqual({ allocated: again.pasidAllocated, pasid: again.bond!.pasid }, { allocated: false, pasid }, "a bind after the last unbind");
      expectEqual(await c.iommu.releaseMm(P(iommu.ReleaseMmRequest, { mmToken: mm })), { pasid, tornDownBonds: 1 }, "ReleaseMm");
      expectEqual(await entriesAt(c, [d0, d1], pasid), [], "entries after ReleaseMm");
      await eventually(
        () => stateOf(c.h, pasid),
        (s) => s === undefined || s.generation !== info.generation,
        "the mm's PASID freed by ReleaseMm",
      );
      expectEqual(await c.iommu.releaseMm(P(iommu.ReleaseMmRequest, { mmToken: mm })), { pasid: 0, tornDownBonds: 0 }, "ReleaseMm of an mm it no longer knows");
    },
  },
  {
    id: "iommu.rpc.sva.refused",
    statement:
      "SvaBind on an unknown device, a device without PASIDs, a device with another attachment at the mm's PASID or whose PASIDs stop below it, or with no mm; SvaUnbind of no bond; ReleaseMm with no mm: refused, nothing changed",
    source: "iommu.proto SvaBind, SvaUnbind, ReleaseMm (errors)",
    async run(c) {
      // An IOASID held for the clause: the mm's PASID is then never 1, and a device can stop below it.
      const guard = await alloc(c.h, await createMmSet(c.h, c.h.uniqueToken()));
      const d = await newDevice(c);
      const mm = c.h.uniqueToken();
      const owner = c.h.uniqueName("sva");
      const pasid = (await c.iommu.svaBind(P(iommu.SvaBindRequest, { deviceId: d, mmToken: mm, owner }))).bond!.pasid;
      expectThat(pasid !== guard.ioasid, `the mm's PASID other than the kit's ${guard.ioasid}`, pasid);
      const none = await newDevice(c, { maxPasids: 0 });
      const below = await newDevice(c, { maxPasids: Math.max(pasid, 2) });
      const taken = await newDevice(c);
      await c.iommu.attachDomain(P(iommu.AttachDomainRequest, { domainId: await newDomain(c, DomainType.DOMAIN_TYPE_PAGING), deviceId: taken, pasid, owner }));
      const devices = [d, none, below, taken];
      const state = async () => ({ tables: await tables(c, devices), core: await coreView(c, [pasid]) });
      const bind =
        (deviceId: string, mmToken = mm) =>
        () =>
          c.iommu.svaBind(P(iommu.SvaBindRequest, { deviceId, mmToken, owner }));
      const refusals: Array<[() => Promise<unknown>, Code, string, string]> = [
        [bind(c.h.uniqueName("none")), Code.NOT_FOUND, "DEVICE_NOT_FOUND", "SvaBind on an unknown device"],
        [bind(none), Code.FAILED_PRECONDITION, "PASID_NOT_SUPPORTED", "SvaBind on a device without PASIDs"],
        [bind(taken), Code.FAILED_PRECONDITION, "PASID_IN_USE", "SvaBind where the mm's PASID is taken"],
        [bind(d, 0n), Code.INVALID_ARGUMENT, "INVALID_FIELD", "SvaBind without an mm"],
        [
          () => c.iommu.svaUnbind(P(iommu.SvaUnbindRequest, { deviceId: c.h.uniqueName("none"), mmToken: mm })),
          Code.NOT_FOUND,
          "DEVICE_NOT_FOUND",
          "SvaUnbind on an unknown device",
        ],
        [() => c.iommu.svaUnbind(P(iommu.SvaUnbindRequest, { deviceId: taken, mmToken: mm })), Code.NOT_FOUND, "SVA_BOND_NOT_FOUND", "SvaUnbind of no bond"],
        [() => c.iommu.releaseMm(P(iommu.ReleaseMmRequest, { mmToken: 0n })), Code.INVALID_ARGUMENT, "INVALID_FIELD", "ReleaseMm without an mm"],
      ];
      if (pasid >= 2) refusals.push([bind(below), Code.INVALID_ARGUMENT, "PASID_OUT_OF_RANGE", "SvaBind on a device whose PASIDs stop below the mm's"]);
      for (const [call, code, reason, what] of refusals) await expectRefusedUnchanged(state, call, code, reason, what);
      await c.iommu.releaseMm(P(iommu.ReleaseMmRequest, { mmToken: mm }));
    },
  },
  {
    id: "iommu.rpc.map-unmap",
    statement:
      "Map makes a PAGING domain translate; Unmap removes it and flushes the range on the devices (UNMAP); bad alignment, an empty range, an overlap, an unknown or non-PAGING domain are refused and change nothing",
    source: "iommu.proto Map, Unmap, Translate",
    async run(c) {
      const d = await newDevice(c);
      const dom = await newDomain(c, DomainType.DOMAIN_TYPE_PAGING);
      const sva = await newDomain(c, DomainType.DOMAIN_TYPE_SVA, { mmToken: c.h.uniqueToken() });
      await c.iommu.attachDomain(P(iommu.AttachDomainRequest, { domainId: dom, deviceId: d, withoutPasid: true, owner: c.h.uniqueName("owner") }));
      await c.iommu.map(P(iommu.MapRequest, { domainId: dom, iova: 0x10_0000n, paddr: 0x4000_0000n, size: 2n * PAGE, access: RW }));
      const hit = await dma(c, d, 0, 0x10_1234n, { withoutPasid: true });
      expectEqual(
        { outcome: hit.outcome, out: hit.outputAddress },
        { outcome: TranslateOutcome.TRANSLATE_OUTCOME_TRANSLATED, out: 0x4000_1234n },
        "a DMA through the mapping",
      );
      const map = (extra: object) => () =>
        c.iommu.map(P(iommu.MapRequest, { domainId: dom, iova: 0x20_0000n, paddr: 0x5000_0000n, size: PAGE, access: RW, ...extra }));
      const unmap = (extra: object) => () => c.iommu.unmap(P(iommu.UnmapRequest, { domainId: dom, iova: 0x10_0000n, size: PAGE, ...extra }));
      const refusals: Array<[() => Promise<unknown>, Code, string, string]> = [
        [map({ iova: 0x20_0001n }), Code.INVALID_ARGUMENT, "ADDRESS_NOT_ALIGNED", "Map of an unaligned IOVA"],
        [map({ size: 0n }), Code.INVALID_ARGUMENT, "INVALID_RANGE", "Map of nothing"],
        [map({ iova: 0x10_1000n }), Code.ALREADY_EXISTS, "IOVA_ALREADY_MAPPED", "Map over a mapping"],
        [map({ domainId: NO_ID }), Code.NOT_FOUND, "DOMAIN_NOT_FOUND", "Map in an unknown domain"],
        [map({ domainId: sva }), Code.FAILED_PRECONDITION, "DOMAIN_NOT_PAGING", "Map in an SVA domain"],
        [unmap({ iova: 0x10_0800n }), Code.INVALID_ARGUMENT, "ADDRESS_NOT_ALIGNED", "Unmap of an unaligned IOVA"],
        [unmap({ size: 0n }), Code.INVALID_ARGUMENT, "INVALID_RANGE", "Unmap of nothing"],
        [unmap({ domainId: NO_ID }), Code.NOT_FOUND, "DOMAIN_NOT_FOUND", "Unmap in an unknown domain"],
        [unmap({ domainId: sva }), Code.FAILED_PRECONDITION, "DOMAIN_NOT_PAGING", "Unmap in an SVA domain"],
      ];
      for (const [call, code, reason, what] of refusals) await expectRefusedUnchanged(() => tables(c, [d], [dom, sva]), call, code, reason, what);
      expectEqual(
        (await c.iommu.unmap(P(iommu.UnmapRequest, { domainId: dom, iova: 0x10_0000n, size: 0x10n * PAGE }))).unmappedSize,
        2n * PAGE,
        "bytes Unmap removed",
      );
      const flush = (await query(c, [d], 1024)).iotlbFlushes.filter((f) => f.deviceId === d && f.cause === IotlbFlushCause.IOTLB_FLUSH_CAUSE_UNMAP);
      expectEqual(
        flush.map((f) => ({ scope: f.scope, address: f.address })),
        [{ scope: iommu.IotlbFlushScope.IOTLB_FLUSH_SCOPE_RANGE, address: 0x10_0000n }],
        "the UNMAP flush of the device",
      );
      const after = await dma(c, d, 0, 0x10_1234n, { withoutPasid: true });
      expectThat(after.outcome !== TranslateOutcome.TRANSLATE_OUTCOME_TRANSLATED, "no translation after Unmap", iommu.translateOutcomeToJSON(after.outcome));
      expectEqual((await c.iommu.unmap(P(iommu.UnmapRequest, { domainId: dom, iova: 0x10_0000n, size: PAGE }))).unmappedSize, 0n, "Unmap of nothing mapped");
    },
  },
  {
    id: "iommu.rpc.guest-pages",
    statement:
      "MapGuestPages makes a guest bind translate in two stages (GVA → GPA → HPA); UnmapGuestPages removes and flushes; another set, no bind, a stale generation, bad alignment, an empty range or an overlap are refused and change nothing",
    source: "iommu.proto MapGuestPages, UnmapGuestPages, Translate (NESTED)",
    async run(c) {
      const v = await newVm(c, 1);
      const intruder = await newVm(c, 1);
      const [d] = v.devices as [string];
      const a = await boundPasid(c, v, 109);
      const other = await alloc(c.h, v.setId);
      const mapReq = (extra: object) =>
        P(iommu.MapGuestPagesRequest, {
          setId: v.setId,
          hpasid: a.ioasid,
          generation: a.generation,
          iova: GVA,
          gpa: GPA + 3n * PAGE,
          size: PAGE,
          access: RW,
          ...extra,
        });
      await c.iommu.mapGuestPages(mapReq({}));
      const through = async () => {
        const r = await dma(c, d, a.ioasid, GVA + 0x10n);
        return { outcome: iommu.translateOutcomeToJSON(r.outcome), out: r.outputAddress };
      };
      expectEqual(await through(), { outcome: "TRANSLATE_OUTCOME_TRANSLATED", out: HPA + 3n * PAGE + 0x10n }, "a DMA through both stages");
      const state = async () => ({ tables: await tables(c, [d]), dma: await through() });
      const unmapReq = (extra: object) =>
        P(iommu.UnmapGuestPagesRequest, { setId: v.setId, hpasid: a.ioasid, generation: a.generation, iova: GVA, size: PAGE, ...extra });
      const refusals: Array<[() => Promise<unknown>, Code, string, string]> = [
        [
          () => c.iommu.mapGuestPages(mapReq({ iova: GVA + PAGE, setId: intruder.setId })),
          Code.PERMISSION_DENIED,
          "IOASID_NOT_IN_SET",
          "MapGuestPages by another set",
        ],
        [
          () => c.iommu.mapGuestPages(mapReq({ iova: GVA + PAGE, hpasid: other.ioasid, generation: 0 })),
          Code.NOT_FOUND,
          "GUEST_BIND_NOT_FOUND",
          "MapGuestPages with no bind",
        ],
        [
          () => c.iommu.mapGuestPages(mapReq({ iova: GVA + PAGE, generation: a.generation + 1 })),
          Code.FAILED_PRECONDITION,
          "STALE_GENERATION",
          "MapGuestPages, stale generation",
        ],
        [() => c.iommu.mapGuestPages(mapReq({ iova: GVA + 1n })), Code.INVALID_ARGUMENT, "ADDRESS_NOT_ALIGNED", "MapGuestPages unaligned"],
        [() => c.iommu.mapGuestPages(mapReq({ iova: GVA + PAGE, size: 0n })), Code.INVALID_ARGUMENT, "INVALID_RANGE", "MapGuestPages of nothing"],
        [() => c.iommu.mapGuestPages(mapReq({})), Code.ALREADY_EXISTS, "IOVA_ALREADY_MAPPED", "MapGuestPages over a mapping"],
        [() => c.iommu.unmapGuestPages(unmapReq({ setId: intruder.setId })), Code.PERMISSION_DENIED, "IOASID_NOT_IN_SET", "UnmapGuestPages by another set"],
        [
          () => c.iommu.unmapGuestPages(unmapReq({ hpasid: other.ioasid, generation: 0 })),
          Code.NOT_FOUND,
          "GUEST_BIND_NOT_FOUND",
          "UnmapGuestPages with no bind",
        ],
        [
          () => c.iommu.unmapGuestPages(unmapReq({ generation: a.generation + 1 })),
          Code.FAILED_PRECONDITION,
          "STALE_GENERATION",
          "UnmapGuestPages, stale generation",
        ],
        [() => c.iommu.unmapGuestPages(unmapReq({ iova: GVA + 8n })), Code.INVALID_ARGUMENT, "ADDRESS_NOT_ALIGNED", "UnmapGuestPages unaligned"],
        [() => c.iommu.unmapGuestPages(unmapReq({ size: 0n })), Code.INVALID_ARGUMENT, "INVALID_RANGE", "UnmapGuestPages of nothing"],
      ];
      for (const [call, code, reason, what] of refusals) await expectRefusedUnchanged(state, call, code, reason, what);
      expectEqual((await c.iommu.unmapGuestPages(unmapReq({ size: 4n * PAGE }))).unmappedSize, PAGE, "bytes UnmapGuestPages removed");
      const flushes = (await query(c, [d], 1024)).iotlbFlushes.filter(
        (f) => f.deviceId === d && f.pasid === a.ioasid && f.scope === iommu.IotlbFlushScope.IOTLB_FLUSH_SCOPE_RANGE,
      );
      expectEqual(
        flushes.map((f) => f.address),
        [GVA],
        "the range flush of UnmapGuestPages",
      );
      expectThat((await through()).outcome !== "TRANSLATE_OUTCOME_TRANSLATED", "no translation after UnmapGuestPages", await through());
    },
  },
  {
    id: "iommu.rpc.translate",
    statement:
      "Translate returns TRANSLATED on a hit, a page request on a PRI miss, and FAULT (NOT_PRESENT, PERMISSION, NO_PASID_ENTRY, PASID_OUT_OF_RANGE) otherwise; an unknown device, no access or a prgi above 511 is refused and changes nothing",
    source: "DESIGN §5 IOMMU Faults; iommu.proto Translate",
    async run(c) {
      const pri = await newDevice(c, { maxPasids: 64 });
      const plain = await newDevice(c, { maxPasids: 64, priCapable: false });
      const dom = await newDomain(c, DomainType.DOMAIN_TYPE_PAGING);
      await c.iommu.map(P(iommu.MapRequest, { domainId: dom, iova: 0x10_0000n, paddr: 0x6000_0000n, size: PAGE, access: { read: true } }));
      const owner = c.h.uniqueName("owner");
      for (const d of [pri, plain]) await c.iommu.attachDomain(P(iommu.AttachDomainRequest, { domainId: dom, deviceId: d, pasid: 3, owner }));
      const outcome = async (deviceId: string, pasid: number, address: bigint, write = false) => {
        const r = await dma(c, deviceId, pasid, address, { write });
        return { outcome: iommu.translateOutcomeToJSON(r.outcome), reason: iommu.faultReasonToJSON(r.faultReason), out: r.outputAddress };
      };
      const fault = (reason: iommu.FaultReason) => ({ outcome: "TRANSLATE_OUTCOME_FAULT", reason: iommu.faultReasonToJSON(reason), out: 0n });
      expectEqual(
        {
          hit: await outcome(pri, 3, 0x10_0042n),
          write: await outcome(pri, 3, 0x10_0042n, true),
          noEntry: await outcome(pri, 4, 0x10_0042n),
          range: await outcome(pri, 64, 0x10_0042n),
          plainMiss: await outcome(plain, 3, 0x30_0000n),
        },
        {
          hit: { outcome: "TRANSLATE_OUTCOME_TRANSLATED", reason: "FAULT_REASON_UNSPECIFIED", out: 0x6000_0042n },
          write: fault(FaultReason.FAULT_REASON_PERMISSION),
          noEntry: fault(FaultReason.FAULT_REASON_NO_PASID_ENTRY),
          range: fault(FaultReason.FAULT_REASON_PASID_OUT_OF_RANGE),
          plainMiss: fault(FaultReason.FAULT_REASON_NOT_PRESENT),
        },
        "Translate's outcomes",
      );
      const miss = await dma(c, pri, 3, 0x30_0000n);
      expectEqual(
        { outcome: iommu.translateOutcomeToJSON(miss.outcome), complete: miss.groupComplete, group: miss.faultGroupId !== 0n },
        { outcome: "TRANSLATE_OUTCOME_PAGE_REQUEST", complete: true, group: true },
        "a miss on a PRI device",
      );
      const refusals: Array<[iommu.TranslateRequest, Code, string]> = [
        [P(iommu.TranslateRequest, { deviceId: c.h.uniqueName("none"), pasid: 3, address: 0n, access: { read: true } }), Code.NOT_FOUND, "DEVICE_NOT_FOUND"],
        [P(iommu.TranslateRequest, { deviceId: pri, pasid: 3, address: 0x10_0000n }), Code.INVALID_ARGUMENT, "INVALID_FIELD"],
        [
          P(iommu.TranslateRequest, {
            deviceId: pri,
            pasid: 3,
            address: 0x40_0000n,
            access: { read: true },
            pageRequestGroup: { prgi: 512, lastRequest: true },
          }),
          Code.INVALID_ARGUMENT,
          "INVALID_FIELD",
        ],
      ];
      for (const [req, code, reason] of refusals) {
        await expectRefusedUnchanged(
          () => tables(c, [pri, plain], [dom]),
          () => c.iommu.translate(req),
          code,
          reason,
          `Translate (expecting ${reason})`,
        );
      }
    },
  },
  {
    id: "iommu.rpc.query-state",
    statement:
      "QueryState filtered by devices returns exactly those devices and their handles; an unknown device is NOT_FOUND DEVICE_NOT_FOUND and changes nothing",
    source: "iommu.proto QueryState",
    async run(c) {
      const v = await newVm(c, 2);
      const [d0] = v.devices as [string, string];
      await boundPasid(c, v, 110);
      const s = await query(c, [d0]);
      expectEqual(
        { devices: s.devices.map((d) => d.deviceId), handleDevices: [...new Set(s.attachHandles.map((h) => h.deviceId))], handles: s.attachHandles.length },
        { devices: [d0], handleDevices: [d0], handles: 2 },
        "QueryState of one device (its stage 2 and its bind)",
      );
      await expectRefusedUnchanged(
        () => tables(c, v.devices),
        () => query(c, [d0, c.h.uniqueName("none")]),
        Code.NOT_FOUND,
        "DEVICE_NOT_FOUND",
        "QueryState naming an unknown device",
      );
    },
  },
  {
    id: "iommu.faults.group-to-handler",
    statement:
      "page requests gather into a group until its last request; the complete group goes once to its owner's stream; SendPageResponse answers it and AwaitPageResponse returns that answer; a reused prgi before the answer is PRGI_IN_USE",
    source: "DESIGN §5 IOMMU Faults; iommu.proto Translate, SubscribeFaultGroups, SendPageResponse, AwaitPageResponse",
    async run(c) {
      const t = await faultTarget(c, c.h.uniqueName("owner"));
      const s = await attachedStream(c, t);
      try {
        const first = await dma(c, t.deviceId, t.pasid, GVA, { prgi: 3, last: false });
        expectEqual(
          { outcome: first.outcome, complete: first.groupComplete },
          { outcome: TranslateOutcome.TRANSLATE_OUTCOME_PAGE_REQUEST, complete: false },
          "a non-last request",
        );
        const g = first.faultGroupId;
        const partial = (await query(c, [t.deviceId])).faultGroups.find((x) => x.faultGroupId === g);
        expectEqual(partial?.state, FaultGroupState.FAULT_GROUP_STATE_PARTIAL, "the group before its last request");
        await expectRefusedUnchanged(
          () => tables(c, [t.deviceId]),
          () => respond(c, t.owner, g, PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS),
          Code.FAILED_PRECONDITION,
          "FAULT_GROUP_INCOMPLETE",
          "SendPageResponse to a partial group",
        );
        const last = await dma(c, t.deviceId, t.pasid, GVA + PAGE, { prgi: 3, last: true });
        expectEqual({ group: last.faultGroupId, complete: last.groupComplete }, { group: g, complete: true }, "the last request of the group");
        const handed = await eventually(
          async () => s.groups(g),
          (x) => x.length > 0,
          "the complete group on the owner's stream",
        );
        expectEqual(
          handed.map((x) => ({ n: x.requests.length, owner: x.owner, data: Buffer.from(x.ownerData).toString(), state: x.state })),
          [{ n: 2, owner: t.owner, data: t.owner, state: FaultGroupState.FAULT_GROUP_STATE_PENDING }],
          "the group handed to the owner",
        );
        await expectRefusedUnchanged(
          () => tables(c, [t.deviceId]),
          () => dma(c, t.deviceId, t.pasid, GVA + 2n * PAGE, { prgi: 3 }),
          Code.FAILED_PRECONDITION,
          "PRGI_IN_USE",
          "a request reusing the prgi of an unanswered group",
        );
        const waiting = settledLater(c.iommu.awaitPageResponse({ deviceId: t.deviceId, faultGroupId: g }));
        await respond(c, t.owner, g, PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS);
        expectEqual(
          await waiting,
          { code: PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS, source: PageResponseSource.PAGE_RESPONSE_SOURCE_HANDLER },
          "AwaitPageResponse",
        );
        await eventually(
          async () => s.answered(g).map((x) => x.responseCode),
          (x) => x.length > 0,
          "the answer on the owner's stream",
        );
        const dev = (await query(c, [t.deviceId])).devices[0]!;
        expectEqual(
          { outstanding: dev.outstandingPageRequests, groups: s.groups(g).length },
          { outstanding: 0, groups: 1 },
          "after the answer (credits back; handed once)",
        );
      } finally {
        s.stop();
      }
    },
  },
  {
    id: "iommu.faults.exactly-one-response",
    statement:
      "a complete group gets exactly one response: a second answer is FAULT_GROUP_ALREADY_RESPONDED; another owner, no code or an unknown group is refused; nothing changes and the stream shows one answer",
    source: "DESIGN §5 IOMMU (every complete group gets exactly one response), §7 S7; iommu.proto SendPageResponse, AwaitPageResponse",
    async run(c) {
      const t = await faultTarget(c, c.h.uniqueName("owner"));
      const s = await attachedStream(c, t);
      try {
        const g = await pendingGroup(c, t, s, GVA);
        const state = () => tables(c, [t.deviceId]);
        await expectRefusedUnchanged(
          state,
          () => respond(c, c.h.uniqueName("intruder"), g, PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS),
          Code.PERMISSION_DENIED,
          "FAULT_GROUP_NOT_OWNED",
          "SendPageResponse by another owner",
        );
        await expectRefusedUnchanged(
          state,
          () => respond(c, t.owner, g, PageResponseCode.PAGE_RESPONSE_CODE_UNSPECIFIED),
          Code.INVALID_ARGUMENT,
          "INVALID_FIELD",
          "SendPageResponse without a code",
        );
        await expectRefusedUnchanged(
          state,
          () => respond(c, t.owner, BigInt(NO_ID) << 16n, PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS),
          Code.NOT_FOUND,
          "FAULT_GROUP_NOT_FOUND",
          "SendPageResponse to an unknown group",
        );
        await respond(c, t.owner, g, PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS);
        await expectRefusedUnchanged(
          state,
          () => respond(c, t.owner, g, PageResponseCode.PAGE_RESPONSE_CODE_INVALID),
          Code.FAILED_PRECONDITION,
          "FAULT_GROUP_ALREADY_RESPONDED",
          "a second answer",
        );
        expectEqual(
          await c.iommu.awaitPageResponse({ deviceId: t.deviceId, faultGroupId: g }),
          { code: PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS, source: PageResponseSource.PAGE_RESPONSE_SOURCE_HANDLER },
          "AwaitPageResponse after the refused second answer",
        );
        await expectRefused(
          c.iommu.awaitPageResponse({ deviceId: t.deviceId, faultGroupId: BigInt(NO_ID) << 16n }),
          Code.NOT_FOUND,
          "FAULT_GROUP_NOT_FOUND",
          "AwaitPageResponse of an unknown group",
        );
        await expectRefused(
          c.iommu.awaitPageResponse({ deviceId: c.h.uniqueName("none"), faultGroupId: g }),
          Code.NOT_FOUND,
          "DEVICE_NOT_FOUND",
          "AwaitPageResponse on an unknown device",
        );
        // A marker after it: what the stream says about the group has all arrived once the marker's answer has.
        const marker = await pendingGroup(c, t, s, GVA + PAGE);
        await respond(c, t.owner, marker, PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS);
        await eventually(
          async () => s.answered(marker).length,
          (n) => n > 0,
          "the marker group's answer on the stream",
        );
        expectEqual(
          s.answered(g).map((x) => iommu.pageResponseCodeToJSON(x.responseCode)),
          ["PAGE_RESPONSE_CODE_SUCCESS"],
          "answers of the group on the owner's stream",
        );
      } finally {
        s.stop();
      }
    },
  },
  {
    id: "iommu.faults.no-handler-failure",
    statement: "a group completed while its owner has no fault stream is answered FAILURE (NO_HANDLER) at once",
    source: "DESIGN §5 IOMMU (no handler answers FAILURE); iommu.proto SubscribeFaultGroups",
    async run(c) {
      const t = await faultTarget(c, c.h.uniqueName("nobody"));
      const r = await dma(c, t.deviceId, t.pasid, GVA);
      expectEqual(r.outcome, TranslateOutcome.TRANSLATE_OUTCOME_PAGE_REQUEST, "a miss on a PRI device");
      expectEqual(
        await c.iommu.awaitPageResponse({ deviceId: t.deviceId, faultGroupId: r.faultGroupId }),
        { code: PageResponseCode.PAGE_RESPONSE_CODE_FAILURE, source: PageResponseSource.PAGE_RESPONSE_SOURCE_NO_HANDLER },
        "the group's response",
      );
      expectEqual((await query(c, [t.deviceId])).faultGroups, [], "outstanding groups");
    },
  },
  {
    id: "iommu.faults.subscribe",
    statement:
      "SubscribeFaultGroups without an owner is INVALID_FIELD; a newer stream of an owner ends the older with ABORTED FAULT_HANDLER_REPLACED and receives the still-unanswered groups",
    source: "iommu.proto SubscribeFaultGroups",
    async run(c) {
      const empty = openStream(c, "");
      await expectStreamRefused(empty, Code.INVALID_ARGUMENT, "INVALID_FIELD", "SubscribeFaultGroups with no owner");
      const t = await faultTarget(c, c.h.uniqueName("owner"));
      const older = await attachedStream(c, t);
      let newer: FaultStream | undefined;
      try {
        const g = await pendingGroup(c, t, older, GVA);
        newer = openStream(c, t.owner);
        const replacing = newer;
        await expectStreamRefused(older, Code.ABORTED, "FAULT_HANDLER_REPLACED", "the older stream");
        await eventually(
          async () => replacing.groups(g).length,
          (n) => n > 0,
          "the unanswered group on the newer stream",
        );
        await respond(c, t.owner, g, PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS);
        await eventually(
          async () => replacing.answered(g).length,
          (n) => n > 0,
          "the answer on the newer stream",
        );
      } finally {
        older.stop();
        newer?.stop();
      }
    },
  },
  {
    id: "iommu.free.settled-at-ack",
    statement:
      "the IOMMU acknowledges a FREE only once the PASID's entries are gone on every device, flushed (IOTLB and DevTLB), and its page requests answered INVALID (queried when its ack is seen)",
    source: "DESIGN §4.3 (acknowledgement means settled), §5 IOMMU (FREE: tear down, flush, drain)",
    async run(c) {
      const v = await newVm(c, 2);
      const [d0] = v.devices as [string, string];
      const a = await boundPasid(c, v, 111);
      const t = { deviceId: d0, pasid: a.ioasid, domainId: 0, owner: v.owner };
      const s = await attachedStreamAtBind(c, v, a, d0);
      try {
        const g = await pendingGroup(c, t, s, GVA + 0x100_0000n);
        const waiting = settledLater(c.iommu.awaitPageResponse({ deviceId: d0, faultGroupId: g }));
        const { seenAtAck } = await freeAndAck(c, v.setId, a, async () => ({
          entries: await entriesAt(c, v.devices, a.ioasid),
          flushed: await flushedAt(c, v.devices, a.ioasid, IotlbFlushCause.IOTLB_FLUSH_CAUSE_IOASID_FREE),
          outstanding: (await query(c, v.devices)).faultGroups.filter((x) => x.pasid === a.ioasid).map((x) => x.faultGroupId),
        }));
        expectEqual(seenAtAck, { entries: [], flushed: v.devices, outstanding: [] }, "the IOMMU's tables when its FREE ack was seen");
        expectEqual(
          await waiting,
          { code: PageResponseCode.PAGE_RESPONSE_CODE_INVALID, source: PageResponseSource.PAGE_RESPONSE_SOURCE_IOASID_FREED },
          "the PASID's page request",
        );
      } finally {
        s.stop();
      }
    },
  },
  {
    id: "iommu.free.releases-with-ack",
    statement: "the IOMMU's FREE ack is SETTLED and releases its bind reference in the same message; the IOASID is then reclaimed",
    source: "DESIGN §4.3 (an ack may release the reference), §5 IOMMU (FREE: … put)",
    async run(c) {
      const v = await newVm(c, 1);
      const a = await boundPasid(c, v, 112);
      const { ack } = await freeAndAck(c, v.setId, a, async () => undefined);
      expectEqual(
        { status: bus.ackStatusToJSON(ack.status), releases: ack.releases.map((r) => r.purpose).length },
        { status: "ACK_STATUS_SETTLED", releases: 1 },
        "the IOMMU's acknowledgement of the FREE",
      );
      await reclaimed(c, a, "the IOASID reclaimed after the IOMMU's release");
    },
  },
  {
    id: "iommu.free.detaches-spid-with-ack",
    statement: "on FREE the IOMMU detaches the SPID with its ack (no DetachSpid of its own, no UNBIND): the SPID is gone and only FREE was emitted",
    source: "DESIGN §5 IOMMU (FREE: detach the SPID, no UNBIND); bus.proto Ack.detach_spid",
    async run(c) {
      const v = await newVm(c, 2);
      const a = await boundPasid(c, v, 113);
      // The kit holds a reference (as KVM would): the IOASID stays FREE_PENDING, its SPID visible.
      await takeKitReference(c, v.setId, a);
      const from = await lastSeq(c.h);
      const { ack } = await freeAndAck(c, v.setId, a, async () => undefined);
      expectEqual(
        { status: bus.ackStatusToJSON(ack.status), detachSpid: ack.detachSpid },
        { status: "ACK_STATUS_SETTLED", detachSpid: true },
        "the FREE's acknowledgement",
      );
      await eventually(
        () => spidOf(c, a.ioasid),
        (s) => s === 0,
        "the SPID detached once the ack is applied",
      );
      expectEqual(await eventsSince(c.h, from, a.ioasid), ["FREE"], "events of the IOASID from its free on");
      await putKitReference(c, v.setId, a);
    },
  },
  {
    id: "iommu.free.unbind-after-free",
    statement: "an UnbindGpasid after the FREE teardown finds nothing: it answers unbound=false, changes nothing and emits nothing",
    source: "DESIGN §5 IOMMU (a later unbind finds nothing and returns); iommu.proto UnbindGpasid",
    async run(c) {
      const v = await newVm(c, 2);
      const [d0, d1] = v.devices as [string, string];
      const a = await boundPasid(c, v, 114);
      await freeAndAck(c, v.setId, a, async () => undefined);
      await eventually(
        () => entriesAt(c, v.devices, a.ioasid),
        (e) => e.length === 0,
        "the entries gone after the FREE",
      );
      const from = await lastSeq(c.h);
      const before = await tables(c, v.devices);
      const late = [await c.iommu.unbindGpasid(unbindRequest(v, a, d0, 114)), await c.iommu.unbindGpasid(unbindRequest(v, a, d1, 0, { generation: 0 }))];
      expectEqual(
        late.map((r) => ({ unbound: r.unbound, last: r.lastUnbind })),
        [
          { unbound: false, last: false },
          { unbound: false, last: false },
        ],
        "the late unbinds' answers",
      );
      expectEqual(await tables(c, v.devices), before, "the tables after the late unbinds");
      // The RECLAIM of the IOMMU's release may be committed meanwhile: only a BIND or UNBIND would be the unbinds'.
      expectEqual(
        (await eventsSince(c.h, from, a.ioasid)).filter((e) => e === "BIND" || e === "UNBIND"),
        [],
        "BIND/UNBIND events of the late unbinds",
      );
    },
  },
  {
    id: "iommu.redelivery.idempotent",
    statement: "a re-delivered FREE (the kit playing the core) is answered the same, with no second teardown, flush or release",
    source: "DESIGN §4.5 (at-least-once; handlers idempotent by sequence)",
    async run(c) {
      const v = await newVm(c, 1);
      const a = await boundPasid(c, v, 115);
      // Settled when its ack was seen: the re-delivery can follow at once.
      const first = await freeAndAck(c, v.setId, a, async () => undefined);
      const before = { tables: await tables(c, v.devices), flushes: await flushedAt(c, v.devices, a.ioasid, IotlbFlushCause.IOTLB_FLUSH_CAUSE_IOASID_FREE) };
      const flushCount = async () => (await query(c, v.devices, 1024)).iotlbFlushes.filter((f) => f.pasid === a.ioasid).length;
      const flushesBefore = await flushCount();
      const again = bus.DeliveryBatch.encode({ deliveries: [{ ...first.delivery, attempt: first.delivery.attempt + 1 }] }).finish();
      const second = await c.h.redeliver("iommu", await iommuInstance(c.h), again, first.headers);
      expectEqual(second.acks, [first.ack], "the answer to the re-delivered FREE");
      expectEqual(
        {
          tables: await tables(c, v.devices),
          flushes: await flushedAt(c, v.devices, a.ioasid, IotlbFlushCause.IOTLB_FLUSH_CAUSE_IOASID_FREE),
          n: await flushCount(),
        },
        { ...before, n: flushesBefore },
        "the IOMMU's tables and flush log after the re-delivery",
      );
    },
  },
  {
    id: "iommu.isolation.other-set",
    statement: "a FREE in one VM's set touches no entry, SPID or reference of another VM's bind of the same guest PASID (S3)",
    source: "DESIGN §3 ownership, §7 S3",
    async run(c) {
      const x = await newVm(c, 1);
      const y = await newVm(c, 1);
      const ax = await boundPasid(c, x, 116);
      const ay = await boundPasid(c, y, 116);
      const before = { tables: await tables(c, y.devices), core: await coreView(c, [ay.ioasid]) };
      await freeAndAck(c, x.setId, ax, async () => undefined);
      await eventually(
        () => entriesAt(c, x.devices, ax.ioasid),
        (e) => e.length === 0,
        "the freed VM's entry gone",
      );
      // The bind first, compactly (a readable failure), then everything else of the other VM.
      expectEqual(
        { entries: await entriesAt(c, y.devices, ay.ioasid), spid: await spidOf(c, ay.ioasid), references: await referencesOf(c.h, ay.ioasid, "iommu") },
        { entries: y.devices, spid: 116, references: 1 },
        "the other VM's bind of the same guest PASID",
      );
      expectEqual({ tables: await tables(c, y.devices), core: await coreView(c, [ay.ioasid]) }, before, "the other VM's tables and IOASID");
    },
  },
  {
    id: "iommu.order.entry-present-at-device-tier",
    statement:
      "when a FREE reaches the DEVICE tier (played by the kit), the IOMMU's entries, SPID and reference for it are all still there: it does not tear down early",
    source: "DESIGN §3 priority order (CPU → DEVICE → IOMMU → LAST), §4.1, §7 S5",
    async run(c) {
      const v = await newVm(c, 2);
      // The kit registers on the set before it has IOASIDs (no replay: DESIGN §3).
      const device = await c.h.playTier(Priority.PRIORITY_DEVICE, { setId: v.setId });
      try {
        const a = await boundPasid(c, v, 117);
        const seen = device.onDelivery(eventOf(EventType.EVENT_TYPE_FREE, a.ioasid), async () => ({
          entries: await entriesAt(c, v.devices, a.ioasid),
          spid: await spidOf(c, a.ioasid),
          references: await referencesOf(c.h, a.ioasid, "iommu"),
        }));
        await free(c.h, v.setId, a.ioasid, a.generation);
        expectEqual(await seen, { entries: v.devices, spid: 117, references: 1 }, "the IOMMU's state when the FREE reached the DEVICE tier");
      } finally {
        await device.close();
      }
    },
  },
  {
    id: "iommu.order.torn-down-at-last-tier",
    statement: "when a FREE reaches the LAST tier (played by the kit), the IOMMU's entries for it are gone on every device and flushed",
    source: "DESIGN §3 priority order, §4.3, §7 S5 (IOMMU entry torn down and flushed before references are released and reclaim)",
    async run(c) {
      const v = await newVm(c, 2);
      const last = await c.h.playTier(Priority.PRIORITY_LAST, { setId: v.setId });
      try {
        const a = await boundPasid(c, v, 118);
        const seen = last.onDelivery(eventOf(EventType.EVENT_TYPE_FREE, a.ioasid), async () => ({
          entries: await entriesAt(c, v.devices, a.ioasid),
          flushed: await flushedAt(c, v.devices, a.ioasid, IotlbFlushCause.IOTLB_FLUSH_CAUSE_IOASID_FREE),
        }));
        await free(c.h, v.setId, a.ioasid, a.generation);
        expectEqual(await seen, { entries: [], flushed: v.devices }, "the IOMMU's tables when the FREE reached the LAST tier");
      } finally {
        await last.close();
      }
    },
  },
  {
    id: "iommu.history.records-changes",
    statement:
      "its changes are recorded with the catalogue's actions: iommu_probe_device, bind_gpasid (first), pasid_entry_set, and for the FREE teardown_pasid, iotlb_flush and iommu_nb_handler with the FREE's seq",
    source: "DESIGN §7 (checked from recorded history); history.proto",
    async run(c) {
      const since = Date.now();
      const v = await newVm(c, 1);
      const [d] = v.devices as [string];
      const a = await boundPasid(c, v, 119);
      const { delivery } = await freeAndAck(c, v.setId, a, async () => undefined);
      const seq = Number(delivery.event!.seq);
      const want = [
        "iommuProbeDevice device",
        `bindGpasid device first ioasid=${a.ioasid} gen=${a.generation} set=${v.setId} spid=119`,
        `pasidEntrySet device NESTED ioasid=${a.ioasid}`,
        `teardownPasid device cause~FREE ioasid=${a.ioasid} seq`,
        `iotlbFlush device devtlb cause~FREE ioasid=${a.ioasid} seq`,
        `iommuNbHandler EVENT_TYPE_FREE released ioasid=${a.ioasid} gen=${a.generation} seq`,
      ];
      await eventually(
        async () => {
          const recs = await c.h.history(since - 1, "iommu");
          const got = new Set<string>();
          for (const r of recs) {
            const act = r.action;
            const onDevice = (device: string) => device === d;
            const ioasidIs = r.ioasid === a.ioasid;
            const atSeq = r.seq === seq;
            switch (act.$case) {
              case "iommuProbeDevice":
                if (onDevice(act.value.device)) got.add("iommuProbeDevice device");
                break;
              case "bindGpasid":
                if (onDevice(act.value.device) && act.value.first)
                  got.add(`bindGpasid device first ioasid=${r.ioasid} gen=${r.generation} set=${r.setId} spid=${r.spid}`);
                break;
              case "pasidEntrySet":
                if (onDevice(act.value.device) && ioasidIs)
                  got.add(`pasidEntrySet device ${act.value.domainType.replace("DOMAIN_TYPE_", "")} ioasid=${r.ioasid}`);
                break;
              case "teardownPasid":
                if (onDevice(act.value.device) && ioasidIs && /FREE/.test(act.value.cause))
                  got.add(`teardownPasid device cause~FREE ioasid=${r.ioasid}${atSeq ? " seq" : ""}`);
                break;
              case "iotlbFlush":
                if (onDevice(act.value.device) && ioasidIs && act.value.devtlb && /FREE/.test(act.value.cause))
                  got.add(`iotlbFlush device devtlb cause~FREE ioasid=${r.ioasid}${atSeq ? " seq" : ""}`);
                break;
              case "iommuNbHandler":
                if (ioasidIs)
                  got.add(
                    `iommuNbHandler ${events.eventTypeToJSON(act.value.type)}${act.value.bindReferenceReleased ? " released" : ""} ioasid=${r.ioasid} gen=${r.generation}${atSeq ? " seq" : ""}`,
                  );
                break;
              default:
                break;
            }
          }
          return want.filter((w) => !got.has(w)).concat([...got].filter((g) => !want.includes(g)).map((g) => `unexpected: ${g}`));
        },
        (missing) => missing.length === 0,
        `history records of the device and the IOASID: ${show(want)}`,
      );
    },
  },
  {
    id: "iommu.restart.restores-and-catches-up",
    statement:
      "killed and restarted, the IOMMU restores its devices, domains and entries, receives the FREE it missed, tears that PASID down and releases its reference; the other bind stays",
    source: "DESIGN §4.4–4.5 (missed deliveries redelivered), §12 (restart)",
    needs: ["restart"],
    async run(c) {
      const v = await newVm(c, 1);
      const [d] = v.devices as [string];
      const gone = await boundPasid(c, v, 120);
      const kept = await boundPasid(c, v, 121);
      await c.h.killTarget();
      // Free always succeeds, the IOMMU down or not (L1); its reference keeps the IOASID from reuse.
      await free(c.h, v.setId, gone.ioasid, gone.generation);
      expectEqual(await referencesOf(c.h, gone.ioasid, "iommu"), 1, "the IOMMU's reference on the freed IOASID while it is down");
      await c.h.startTarget();
      await eventually(
        async () => {
          const s = await query(c, [d]);
          return s.devices[0]!.pasidEntries.map((e) => (e.withoutPasid ? "rid" : String(e.pasid))).sort();
        },
        (e) => JSON.stringify(e) === JSON.stringify([String(kept.ioasid), "rid"].sort()),
        `the restored device's table to hold the stage 2 and ${kept.ioasid} once the missed FREE of ${gone.ioasid} is handled`,
      );
      await reclaimed(c, gone, "the IOASID freed while the IOMMU was down reclaimed");
      expectEqual(await referencesOf(c.h, kept.ioasid, "iommu"), 1, "the IOMMU's reference on the IOASID still bound");
      const domains = (await query(c, [])).domains.map((x) => x.domainId);
      expectThat(domains.includes(v.stage2), `the stage 2 domain ${v.stage2} restored`, domains);
    },
  },
  {
    id: "iommu.restart.resubscribes-no-leak",
    statement: "after a restart the IOMMU binds on its restored devices and handles new FREEs; once both IOASIDs are freed it holds no reference",
    source: "DESIGN §4.5, §12 (resubscribe, nothing leaked)",
    needs: ["restart"],
    async run(c) {
      const v = await newVm(c, 1);
      const before = await boundPasid(c, v, 122);
      await c.h.restartTarget();
      const after = await boundPasid(c, v, 123);
      await free(c.h, v.setId, before.ioasid, before.generation);
      await free(c.h, v.setId, after.ioasid, after.generation);
      await eventually(
        async () => [await stateOf(c.h, before.ioasid), await stateOf(c.h, after.ioasid)],
        ([x, y]) => (x === undefined || x.generation !== before.generation) && (y === undefined || y.generation !== after.generation),
        "both IOASIDs (bound before and after the restart) reclaimed",
      );
      expectEqual(await entriesAt(c, v.devices, before.ioasid), [], "entries of the first IOASID");
      expectEqual(await entriesAt(c, v.devices, after.ioasid), [], "entries of the second IOASID");
    },
  },
];

/** The IOMMU role's contract (DESIGN §5 "IOMMU", §4, §7; iommu.proto). */
export const iommuSuite: RoleSuite<IommuCtx> = {
  role: "iommu",
  summary: "the host IOMMU (VT-d driver): devices, domains, PASID tables, attach handles, guest binds, native SVA and page faults; tears a PASID down on FREE",
  target: "ioasid.iommu.v1.IommuService and grpc.health.v1 at --target; the core at IOASID_CORE_ADDRESS; NATS at NATS_URL",
  prepare: (h) => ({ h, iommu: createClient(iommu.IommuServiceService, h.target, { deadlineMs: 10_000 }) }),
  clauses,
  close: (c) => c.iommu.close(),
};

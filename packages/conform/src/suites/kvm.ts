import { Code } from "@ioasid/errors";
import { createClient, type PromiseClient } from "@ioasid/grpc-kit";
import { bus, events, history as historyProto, kvm } from "@ioasid/proto";
import { ClauseFailure, eventually, expectEqual, expectRefusedUnchanged, expectThat, show, type Clause } from "../clause.js";
import type { Harness, Tap } from "../harness.js";
import type { RoleSuite } from "../suite.js";
import { allocBound, createMmSet, deliveryOf, detachSpid, eventOf, free, referencesOf, stateOf } from "./core-steps.js";

type KvmClient = PromiseClient<typeof kvm.KvmServiceService>;

/** What the KVM clauses run with. */
export interface KvmCtx {
  readonly h: Harness;
  readonly kvm: KvmClient;
}

const { EventType, Priority } = events;
/** IA32_PASID for a guest PASID: bit 31 valid, bits 19:0 the PASID (kvm.proto Enqcmd). */
const ia32 = (gpasid: number): number => (0x8000_0000 | gpasid) >>> 0;

/** A VM (fresh MM token), and the subscriber KVM registered for it. */
async function newVm(c: KvmCtx, opts: { withSet?: boolean; vcpus?: number } = {}): Promise<{ vm: kvm.Vm; token: bigint; setId: number; instance: string }> {
  const token = c.h.uniqueToken();
  const vm = (await c.kvm.createVm(kvm.CreateVmRequest.fromPartial({ mmToken: token, vcpuCount: opts.vcpus ?? 2, vmName: c.h.uniqueName("vm") }))).vm!;
  const setId = opts.withSet === false ? 0 : await createMmSet(c.h, token);
  return { vm, token, setId, instance: await kvmInstanceFor(c.h, token) };
}

/** The subscriber instance KVM registered by `token` (DESIGN §5: per VM, by MM token, CPU priority). */
async function kvmInstanceFor(h: Harness, token: bigint): Promise<string> {
  const regs = (await h.core.listRegistrations({})).registrations;
  const r = regs.find((x) => x.subscriber?.name === "kvm" && x.scope?.$case === "mmToken" && x.scope.value === token);
  if (r === undefined)
    throw new ClauseFailure(
      `a registration of subscriber "kvm" by MM token ${token}`,
      show(regs.map((x) => `${x.subscriber?.name}/${x.subscriber?.instance}`)),
    );
  return r.subscriber!.instance;
}

async function vmState(c: KvmCtx, vmId: number): Promise<kvm.Vm> {
  return (await c.kvm.queryState({ vmId })).vms[0]!;
}

/** A VM's table as `gpasid->hpasid`. */
async function tableOf(c: KvmCtx, vmId: number): Promise<string[]> {
  return (await vmState(c, vmId)).translations.map((t) => `${t.gpasid}->${t.hpasid}`);
}

/** The whole of KVM's answer to QueryState with times left out (what a refused call must not change). */
async function everything(c: KvmCtx): Promise<unknown> {
  const all = await c.kvm.queryState({ vmId: 0 });
  return all.vms.map((v) => ({ ...v, createdAt: undefined, translations: v.translations.map((t) => ({ ...t, installedAt: undefined })) }));
}

/** Binds `spid` in the VM's set and waits until KVM installed it. */
async function bound(c: KvmCtx, vm: { vm: kvm.Vm; setId: number }, spid: number): Promise<{ ioasid: number; generation: number }> {
  const a = await allocBound(c.h, vm.setId, spid);
  await eventually(
    () => tableOf(c, vm.vm.vmId),
    (t) => t.includes(`${spid}->${a.ioasid}`),
    `KVM's table to hold ${spid}->${a.ioasid} after BIND`,
  );
  return a;
}

async function withTap<T>(c: KvmCtx, instance: string, body: (tap: Tap) => Promise<T>): Promise<T> {
  const tap = c.h.tap("kvm", instance);
  try {
    return await body(tap);
  } finally {
    tap.close();
  }
}

const clauses: Clause<KvmCtx>[] = [
  {
    id: "kvm.rpc.create-vm",
    statement: "CreateVm registers the VM's notifier by MM token at CPU priority, PENDING until its set exists",
    source: "DESIGN §5 KVM; kvm.proto CreateVm",
    async run(c) {
      const { vm, token } = await newVm(c, { withSet: false });
      expectEqual(vm.registration, kvm.RegistrationState.REGISTRATION_STATE_PENDING, "registration before the set exists");
      expectEqual(vm.translations.length, 0, "a new VM's table size");
      const regs = (await c.h.core.listRegistrations({})).registrations.filter((r) => r.scope?.$case === "mmToken" && r.scope.value === token);
      expectEqual(
        regs.map((r) => ({ name: r.subscriber?.name, priority: r.priority, active: r.active })),
        [{ name: "kvm", priority: Priority.PRIORITY_CPU, active: false }],
        "the core's registrations by the VM's token",
      );
    },
  },
  {
    id: "kvm.registration.pending-activates",
    statement: "a PENDING registration becomes ACTIVE, with the set's id, when VFIO creates the set (L4)",
    source: "DESIGN §3 notifier registration, §7 L4",
    async run(c) {
      const { vm, token } = await newVm(c, { withSet: false });
      const setId = await createMmSet(c.h, token);
      const after = await eventually(
        () => vmState(c, vm.vmId),
        (v) => v.registration === kvm.RegistrationState.REGISTRATION_STATE_ACTIVE,
        "the VM's registration ACTIVE",
      );
      expectEqual(after.setId, setId, "the VM's set id once active");
    },
  },
  {
    id: "kvm.rpc.create-vm.refused-duplicate",
    statement: "CreateVm with an MM token a VM already has is ALREADY_EXISTS VM_EXISTS and changes nothing",
    source: "kvm.proto CreateVm",
    async run(c) {
      const { token } = await newVm(c, { withSet: false });
      await expectRefusedUnchanged(
        () => everything(c),
        () => c.kvm.createVm(kvm.CreateVmRequest.fromPartial({ mmToken: token, vmName: "again" })),
        Code.ALREADY_EXISTS,
        "VM_EXISTS",
      );
    },
  },
  {
    id: "kvm.rpc.create-vm.refused-invalid",
    statement: "CreateVm without an MM token is INVALID_ARGUMENT INVALID_FIELD and changes nothing",
    source: "kvm.proto (common errors; mm_token non-zero)",
    async run(c) {
      await expectRefusedUnchanged(
        () => everything(c),
        () => c.kvm.createVm(kvm.CreateVmRequest.fromPartial({ mmToken: 0n })),
        Code.INVALID_ARGUMENT,
        "INVALID_FIELD",
      );
    },
  },
  {
    id: "kvm.rpc.create-vm.refused-set-not-empty",
    statement: "CreateVm for a set that already has IOASIDs is FAILED_PRECONDITION SET_NOT_EMPTY, with no VM and no registration left",
    source: "DESIGN §3 (no replay, no lost events); kvm.proto CreateVm",
    async run(c) {
      const token = c.h.uniqueToken();
      const setId = await createMmSet(c.h, token);
      await allocBound(c.h, setId, 1);
      await expectRefusedUnchanged(
        async () => ({ kvm: await everything(c), regs: (await c.h.core.listRegistrations({})).registrations.length }),
        () => c.kvm.createVm(kvm.CreateVmRequest.fromPartial({ mmToken: token })),
        Code.FAILED_PRECONDITION,
        "SET_NOT_EMPTY",
      );
    },
  },
  {
    id: "kvm.rpc.destroy-vm",
    statement: "DestroyVm clears the VM's table, releases every reference it holds and withdraws its registration",
    source: "DESIGN §5 KVM (VM destruction drops every reference); kvm.proto DestroyVm",
    async run(c) {
      const v = await newVm(c);
      const a = await bound(c, v, 7);
      const b = await bound(c, v, 8);
      const res = await c.kvm.destroyVm({ vmId: v.vm.vmId });
      expectEqual({ cleared: res.clearedEntries, released: res.releasedReferences }, { cleared: 2, released: 2 }, "DestroyVm's answer");
      expectEqual([await referencesOf(c.h, a.ioasid, "kvm"), await referencesOf(c.h, b.ioasid, "kvm")], [0, 0], "KVM's references after DestroyVm");
      const regs = (await c.h.core.listRegistrations({})).registrations.filter((r) => r.scope?.$case === "mmToken" && r.scope.value === v.token);
      expectEqual(regs.length, 0, "registrations by the VM's token after DestroyVm");
    },
  },
  {
    id: "kvm.rpc.destroy-vm.refused-unknown",
    statement: "DestroyVm of a VM that does not exist is NOT_FOUND VM_NOT_FOUND and changes nothing",
    source: "kvm.proto DestroyVm",
    async run(c) {
      await expectRefusedUnchanged(
        () => everything(c),
        () => c.kvm.destroyVm({ vmId: 0x7fff_fff0 }),
        Code.NOT_FOUND,
        "VM_NOT_FOUND",
      );
    },
  },
  {
    id: "kvm.rpc.enqcmd",
    statement: "ENQCMD translates a bound guest PASID; an invalid IA32_PASID or an unbound one is a #GP, not an error",
    source: "DESIGN §5 KVM (ENQCMD, IA32_PASID); kvm.proto Enqcmd",
    async run(c) {
      const v = await newVm(c);
      const a = await bound(c, v, 9);
      const ok = await c.kvm.enqcmd({ vmId: v.vm.vmId, vcpu: 1, ia32Pasid: ia32(9) });
      expectEqual(
        { outcome: ok.outcome, hpasid: ok.hpasid },
        { outcome: kvm.EnqcmdOutcome.ENQCMD_OUTCOME_TRANSLATED, hpasid: a.ioasid },
        "ENQCMD of a bound guest PASID",
      );
      const notValid = await c.kvm.enqcmd({ vmId: v.vm.vmId, vcpu: 0, ia32Pasid: 9 });
      expectEqual(notValid.gpCause, kvm.GpCause.GP_CAUSE_PASID_NOT_VALID, "ENQCMD with IA32_PASID bit 31 clear");
      const reserved = await c.kvm.enqcmd({ vmId: v.vm.vmId, vcpu: 0, ia32Pasid: (ia32(9) | 0x0010_0000) >>> 0 });
      expectEqual(reserved.gpCause, kvm.GpCause.GP_CAUSE_RESERVED_BITS, "ENQCMD with reserved bits set");
      const none = await c.kvm.enqcmd({ vmId: v.vm.vmId, vcpu: 0, ia32Pasid: ia32(10) });
      expectEqual(
        { outcome: none.outcome, cause: none.gpCause },
        { outcome: kvm.EnqcmdOutcome.ENQCMD_OUTCOME_GP, cause: kvm.GpCause.GP_CAUSE_NO_TRANSLATION },
        "ENQCMD of an unbound guest PASID",
      );
    },
  },
  {
    id: "kvm.rpc.enqcmd.refused",
    statement: "ENQCMD on a vCPU the VM does not have is INVALID_ARGUMENT VCPU_OUT_OF_RANGE; on no VM NOT_FOUND VM_NOT_FOUND; neither changes anything",
    source: "kvm.proto Enqcmd",
    async run(c) {
      const v = await newVm(c, { vcpus: 2 });
      await bound(c, v, 3);
      await expectRefusedUnchanged(
        () => everything(c),
        () => c.kvm.enqcmd({ vmId: v.vm.vmId, vcpu: 2, ia32Pasid: ia32(3) }),
        Code.INVALID_ARGUMENT,
        "VCPU_OUT_OF_RANGE",
      );
      await expectRefusedUnchanged(
        () => everything(c),
        () => c.kvm.enqcmd({ vmId: 0x7fff_fff1, vcpu: 0, ia32Pasid: ia32(3) }),
        Code.NOT_FOUND,
        "VM_NOT_FOUND",
      );
    },
  },
  {
    id: "kvm.rpc.query-state.refused-unknown",
    statement: "QueryState of a VM that does not exist is NOT_FOUND VM_NOT_FOUND",
    source: "kvm.proto QueryState",
    async run(c) {
      await expectRefusedUnchanged(
        () => everything(c),
        () => c.kvm.queryState({ vmId: 0x7fff_fff2 }),
        Code.NOT_FOUND,
        "VM_NOT_FOUND",
      );
    },
  },
  {
    id: "kvm.bind.installs",
    statement: "BIND installs gpasid→hpasid in the VM's table and takes one reference",
    source: "DESIGN §5 KVM (BIND: take a reference, insert gpasid→hpasid)",
    async run(c) {
      const v = await newVm(c);
      const a = await bound(c, v, 11);
      expectEqual(await referencesOf(c.h, a.ioasid, "kvm"), 1, "KVM's references on the bound IOASID");
      expectEqual((await vmState(c, v.vm.vmId)).referencesHeld, 1, "references_held of the VM");
    },
  },
  {
    id: "kvm.unbind.removes",
    statement: "UNBIND removes the entry and releases the reference with the acknowledgement",
    source: "DESIGN §5 KVM (UNBIND: remove, put)",
    async run(c) {
      const v = await newVm(c);
      const a = await bound(c, v, 12);
      await withTap(c, v.instance, async (tap) => {
        const acked = tap.ackOf(deliveryOf(EventType.EVENT_TYPE_UNBIND, a.ioasid), async (ack) => ack);
        await detachSpid(c.h, v.setId, a.ioasid, a.generation);
        const { seenAtAck } = await acked;
        const releases = seenAtAck.acks.flatMap((x) => x.releases.map((r) => r.purpose));
        expectThat(releases.length === 1, "one release in the UNBIND's acknowledgement", releases, "the ack's releases");
      });
      await eventually(
        () => tableOf(c, v.vm.vmId),
        (t) => t.length === 0,
        "the entry gone after UNBIND",
      );
      expectEqual(await referencesOf(c.h, a.ioasid, "kvm"), 0, "KVM's references after UNBIND");
    },
  },
  {
    id: "kvm.free.settled-at-ack",
    statement: "KVM acknowledges a FREE only once the VM's entry is gone (queried when its ack is seen on the bus)",
    source: "DESIGN §4.3 (acknowledgement means the context is settled)",
    async run(c) {
      const v = await newVm(c);
      const a = await bound(c, v, 13);
      await withTap(c, v.instance, async (tap) => {
        const acked = tap.ackOf(deliveryOf(EventType.EVENT_TYPE_FREE, a.ioasid), async () => tableOf(c, v.vm.vmId));
        await free(c.h, v.setId, a.ioasid, a.generation);
        const { seenAtAck } = await acked;
        expectEqual(seenAtAck, [], "the VM's table when KVM's FREE ack was seen");
      });
    },
  },
  {
    id: "kvm.free.releases-with-ack",
    statement: "KVM's FREE ack is SETTLED and carries the release of its reference; the IOASID is then reclaimed",
    source: "DESIGN §4.3 (an ack may release the reference in the same message), §5 KVM (FREE: remove, put)",
    async run(c) {
      const v = await newVm(c);
      const a = await bound(c, v, 14);
      const ack = await withTap(c, v.instance, async (tap) => {
        const acked = tap.ackOf(deliveryOf(EventType.EVENT_TYPE_FREE, a.ioasid), async (x) => x);
        await free(c.h, v.setId, a.ioasid, a.generation);
        return (await acked).seenAtAck;
      });
      const mine = ack.acks.find((x) => x.status !== bus.AckStatus.ACK_STATUS_UNSPECIFIED);
      expectEqual(
        { status: mine?.status, releases: mine?.releases.length },
        { status: bus.AckStatus.ACK_STATUS_SETTLED, releases: 1 },
        "KVM's acknowledgement of the FREE",
      );
      await eventually(
        () => stateOf(c.h, a.ioasid),
        (s) => s === undefined || s.generation !== a.generation,
        "the IOASID reclaimed after the FREE",
      );
    },
  },
  {
    id: "kvm.redelivery.idempotent",
    statement: "a re-delivered BIND is answered the same and takes no second reference",
    source: "DESIGN §4.5 (at-least-once; handlers idempotent by sequence)",
    async run(c) {
      const v = await newVm(c);
      await withTap(c, v.instance, async (tap) => {
        const acked = tap.ackOf(
          (d) => d.event?.type === EventType.EVENT_TYPE_BIND,
          async (x) => x,
        );
        const a = await allocBound(c.h, v.setId, 15);
        const { delivery, seenAtAck } = await acked;
        await eventually(
          () => tableOf(c, v.vm.vmId),
          (t) => t.length === 1,
          "the BIND installed",
        );
        const again = bus.DeliveryBatch.encode({ deliveries: delivery.batch.deliveries.map((d) => ({ ...d, attempt: d.attempt + 1 })) }).finish();
        const second = await c.h.redeliver("kvm", v.instance, again, delivery.headers);
        expectEqual(second.acks, seenAtAck.acks, "the answer to the re-delivered BIND");
        expectEqual(await referencesOf(c.h, a.ioasid, "kvm"), 1, "KVM's references after the re-delivery");
        expectEqual(await tableOf(c, v.vm.vmId), [`15->${a.ioasid}`], "the VM's table after the re-delivery");
      });
    },
  },
  {
    id: "kvm.isolation.other-set",
    statement: "a FREE in one VM's set touches no entry or reference of another VM (S3)",
    source: "DESIGN §7 S3",
    async run(c) {
      const x = await newVm(c);
      const y = await newVm(c);
      const ax = await bound(c, x, 16);
      const ay = await bound(c, y, 16);
      // Looked at once KVM acknowledged the FREE, when all its handling is done: the entry of the
      // freed VM gone is not enough (an implementation that clears it first and then touches
      // another VM passed this clause in some runs: the test's touches-other-vm mutant).
      await withTap(c, x.instance, async (tap) => {
        const acked = tap.ackOf(deliveryOf(EventType.EVENT_TYPE_FREE, ax.ioasid), async () => undefined);
        await free(c.h, x.setId, ax.ioasid, ax.generation);
        await acked;
      });
      await eventually(
        () => tableOf(c, x.vm.vmId),
        (t) => t.length === 0,
        "the freed VM's entry gone",
      );
      expectEqual(await tableOf(c, y.vm.vmId), [`16->${ay.ioasid}`], "the other VM's table");
      expectEqual(await referencesOf(c.h, ay.ioasid, "kvm"), 1, "KVM's reference on the other VM's IOASID");
    },
  },
  {
    id: "kvm.unbind-after-free.harmless",
    statement: "an UNBIND after the FREE (the kit playing the core) is acknowledged SETTLED, releases nothing and changes nothing",
    source: "DESIGN §5 KVM (an UNBIND after FREE is harmless)",
    async run(c) {
      const v = await newVm(c);
      const a = await bound(c, v, 17);
      const freeDelivery = await withTap(c, v.instance, async (tap) => {
        const acked = tap.ackOf(deliveryOf(EventType.EVENT_TYPE_FREE, a.ioasid), async () => undefined);
        await free(c.h, v.setId, a.ioasid, a.generation);
        return (await acked).delivery;
      });
      // After the FREE: its entry gone.
      await eventually(
        () => tableOf(c, v.vm.vmId),
        (t) => t.length === 0,
        "the entry gone after FREE",
      );
      const d = freeDelivery.batch.deliveries.find((x) => x.event?.ioasid === a.ioasid)!;
      // A sequence number far past anything the core has committed: never one the core will use in this run.
      const unbind = { ...d, attempt: 1, event: { ...d.event!, type: EventType.EVENT_TYPE_UNBIND, seq: d.event!.seq + 1_000_000_000n } };
      const before = await everything(c);
      const answer = await c.h.redeliver("kvm", v.instance, bus.DeliveryBatch.encode({ deliveries: [unbind] }).finish());
      expectEqual(
        answer.acks.map((x) => ({ status: x.status, releases: x.releases.length })),
        [{ status: bus.AckStatus.ACK_STATUS_SETTLED, releases: 0 }],
        "KVM's answer to an UNBIND after FREE",
      );
      expectEqual(await everything(c), before, "KVM's state after the UNBIND");
    },
  },
  {
    id: "kvm.order.cleared-before-device-tier",
    statement: "when a FREE reaches the DEVICE tier (played by the kit), KVM's entry for it is already gone (S5)",
    source: "DESIGN §3 priority order, §4.1 tier order, §7 S5",
    async run(c) {
      // The kit registers by the VM's token before the set exists, as VDCM would (no replay: §3).
      const pending = await newVm(c, { withSet: false });
      const device = await c.h.playTier(Priority.PRIORITY_DEVICE, { mmToken: pending.token });
      try {
        const v = { ...pending, setId: await createMmSet(c.h, pending.token) };
        const a = await bound(c, v, 18);
        const seen = device.onDelivery(eventOf(EventType.EVENT_TYPE_FREE, a.ioasid), () => tableOf(c, v.vm.vmId));
        await free(c.h, v.setId, a.ioasid, a.generation);
        expectEqual(await seen, [], "KVM's table when the FREE reached the DEVICE tier");
      } finally {
        await device.close();
      }
    },
  },
  {
    id: "kvm.history.records-changes",
    statement: "every change is recorded with the catalogue's action: kvm_create_vm, vmcs_update INSTALL and CLEAR (cause FREE) with the IOASID and SPID",
    source: "DESIGN §7 (checked from recorded history); history.proto",
    async run(c) {
      const since = Date.now();
      const v = await newVm(c);
      const a = await bound(c, v, 19);
      await free(c.h, v.setId, a.ioasid, a.generation);
      await eventually(
        () => tableOf(c, v.vm.vmId),
        (t) => t.length === 0,
        "the entry gone after FREE",
      );
      const want = [
        { action: "kvm_create_vm", ioasid: undefined, spid: undefined, detail: `token ${v.token}` },
        { action: "vmcs_update", ioasid: a.ioasid, spid: 19, detail: "VMCS_UPDATE_KIND_INSTALL" },
        { action: "vmcs_update", ioasid: a.ioasid, spid: 19, detail: "VMCS_UPDATE_KIND_CLEAR VMCS_CLEAR_CAUSE_FREE" },
      ];
      await eventually(
        async () => {
          const recs = await c.h.history(since - 1, "kvm");
          return recs
            .map((r) => {
              const act = r.action;
              if (act.$case === "kvmCreateVm" && act.value.mmToken === v.token)
                return { action: "kvm_create_vm", ioasid: undefined, spid: undefined, detail: `token ${v.token}` };
              if (act.$case === "vmcsUpdate" && r.ioasid === a.ioasid && r.generation === a.generation) {
                const u = act.value;
                const gpasidOk = u.gpasid === 19 && u.hpasid === a.ioasid;
                const detail =
                  u.kind === historyProto.VmcsUpdateKind.VMCS_UPDATE_KIND_INSTALL
                    ? "VMCS_UPDATE_KIND_INSTALL"
                    : `VMCS_UPDATE_KIND_CLEAR ${historyProto.vmcsClearCauseToJSON(u.cause)}`;
                return { action: "vmcs_update", ioasid: r.ioasid, spid: gpasidOk ? 19 : -1, detail };
              }
              return undefined;
            })
            .filter((x) => x !== undefined);
        },
        (got) => JSON.stringify(got) === JSON.stringify(want),
        `history records ${show(want)}`,
      );
    },
  },
  {
    id: "kvm.restart.restores-and-catches-up",
    statement: "killed and restarted, KVM restores its VMs and tables, receives the FREE it missed, clears the entry and releases its reference",
    source: "DESIGN §4.4–4.5 (missed deliveries redelivered), §12 (restart)",
    needs: ["restart"],
    async run(c) {
      const v = await newVm(c);
      const gone = await bound(c, v, 20);
      const kept = await bound(c, v, 21);
      await c.h.killTarget();
      // Free always succeeds, KVM down or not (L1); KVM's reference keeps the IOASID from reuse.
      await free(c.h, v.setId, gone.ioasid, gone.generation);
      expectEqual(await referencesOf(c.h, gone.ioasid, "kvm"), 1, "KVM's reference on the freed IOASID while KVM is down");
      await c.h.startTarget();
      await eventually(
        () => tableOf(c, v.vm.vmId),
        (t) => JSON.stringify(t) === JSON.stringify([`21->${kept.ioasid}`]),
        `the restored VM's table to be [21->${kept.ioasid}] once the missed FREE is handled`,
      );
      await eventually(
        () => stateOf(c.h, gone.ioasid),
        (s) => s === undefined || s.generation !== gone.generation,
        "the freed IOASID reclaimed",
      );
      expectEqual(await referencesOf(c.h, kept.ioasid, "kvm"), 1, "KVM's reference on the IOASID still bound");
    },
  },
  {
    id: "kvm.restart.resubscribes-no-leak",
    statement: "after a restart KVM receives new BINDs for its restored VMs, and destroying the VM leaves no reference behind",
    source: "DESIGN §4.5, §12 (resubscribe, nothing leaked)",
    needs: ["restart"],
    async run(c) {
      const v = await newVm(c);
      const before = await bound(c, v, 22);
      await c.h.restartTarget();
      const after = await bound(c, v, 23);
      await c.kvm.destroyVm({ vmId: v.vm.vmId });
      expectEqual(
        [await referencesOf(c.h, before.ioasid, "kvm"), await referencesOf(c.h, after.ioasid, "kvm")],
        [0, 0],
        "KVM's references after the restored VM is destroyed",
      );
    },
  },
];

/** The KVM role's contract (DESIGN §5 "KVM", §4, §7). */
export const kvmSuite: RoleSuite<KvmCtx> = {
  role: "kvm",
  summary: "the host's KVM: per VM, the VMCS PASID translation table ENQCMD consults, kept by IOASID events",
  target: "ioasid.kvm.v1.KvmService and grpc.health.v1 at --target; the core at IOASID_CORE_ADDRESS; NATS at NATS_URL",
  prepare: (h) => ({ h, kvm: createClient(kvm.KvmServiceService, h.target, { deadlineMs: 10_000 }) }),
  clauses,
  close: (c) => c.kvm.close(),
};

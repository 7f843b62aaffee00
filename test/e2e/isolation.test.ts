import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code, DomainError } from "@ioasid/errors";
import { createClient, createVfioSession, type VfioSession } from "@ioasid/grpc-kit";
import { core, iommu, kvm, vdcm, vfio } from "@ioasid/proto";
import { waitFor } from "@ioasid/testkit";
import { startStack, type StackFixture } from "../support/stack-fixture.js";

// Malfunction is limited to the guest's own resources (ioasid.rst "Exception cases" rule 3): a
// second VM's attempts on the first VM's PASIDs — host or guest numbering, through every role —
// are refused and change nothing (S3). Each VM has its own VMM — its own VFIO session and
// capability store (DESIGN §3): B's attempts on A's container carry B's capability or none.

const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);

let stack: StackFixture;
const sessions: AbortController[] = [];
const vmms: VfioSession[] = [];
beforeAll(async () => {
  stack = await startStack();
}, 60_000);
afterAll(async () => {
  for (const s of sessions) s.abort();
  for (const v of vmms) v.close();
  await stack?.stop();
});

/** A VMM of its own: a VFIO client whose capability store holds only what it opened. */
function newVmm(): VfioSession {
  const vmm = createVfioSession(
    createClient(vfio.VfioServiceService, stack.addresses.vfio, stack.vmmTls === undefined ? {} : { tls: stack.vmmTls, serverRole: "vfio" }),
  );
  vmms.push(vmm);
  return vmm;
}

interface Vm {
  readonly vmm: VfioSession;
  readonly vmId: number;
  readonly containerId: number;
  readonly setId: number;
  readonly mdev: string;
}

async function startVm(name: string, token: bigint, wq: number): Promise<Vm> {
  const c = stack.clients;
  const vmm = newVmm();
  const vm = (await c.kvm.createVm(P(kvm.CreateVmRequest, { mmToken: token, vcpuCount: 1, vmName: name }))).vm!;
  const opened = await vmm.openContainer(P(vfio.OpenContainerRequest, { mmToken: token, quota: 8, vmName: name }));
  const session = new AbortController();
  sessions.push(session);
  void (async () => {
    try {
      for await (const _ of vmm.session({ containerId: opened.containerId }, { signal: session.signal })) void _;
    } catch {
      // closed at the end of the test
    }
  })();
  const mdev = `mdev-${name}`;
  await c.vdcm.createMdev(P(vdcm.CreateMdevRequest, { parentDeviceId: "iax0", mdevUuid: mdev, wqIds: [wq] }));
  await vmm.assignDevice(P(vfio.AssignDeviceRequest, { containerId: opened.containerId, device: { ref: { $case: "mdevUuid", value: mdev } } }));
  return { vmm, vmId: vm.vmId, containerId: opened.containerId, setId: opened.setId, mdev };
}

async function refused(call: Promise<unknown>, what: string): Promise<DomainError> {
  try {
    await call;
  } catch (err) {
    expect(err, what).toBeInstanceOf(DomainError);
    expect([Code.PERMISSION_DENIED, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.INVALID_ARGUMENT], `${what}: ${(err as DomainError).reason}`).toContain(
      (err as DomainError).code,
    );
    return err as DomainError;
  }
  throw new Error(`${what} was accepted`);
}

describe("isolation between guests", () => {
  it("refuses every attempt of a second VM on the first VM's PASIDs, and changes nothing", async () => {
    const c = stack.clients;
    await c.vdcm.registerDevice(
      P(vdcm.RegisterDeviceRequest, {
        deviceId: "iax0",
        maxPasidEntries: 64,
        wqs: [0, 1].map((wqId) => ({ wqId, mode: vdcm.WqMode.WQ_MODE_DEDICATED, size: 8 })),
      }),
    );
    await c.iommu.registerDevice(
      P(iommu.RegisterDeviceRequest, {
        deviceId: "iax0",
        maxPasids: 1 << 20,
        priCapable: true,
        function: iommu.DeviceFunction.DEVICE_FUNCTION_PF,
        iommuGroup: 3,
      }),
    );
    const a = await startVm("victim", 0xa11cen, 0);
    const b = await startVm("attacker", 0xbadn, 1);

    // VM A: guest PASID 101 bound to its host PASID, in KVM's table, programmed in its WQ.
    const x = await a.vmm.allocPasid({ containerId: a.containerId });
    await a.vmm.bindGuestPasid(
      P(vfio.BindGuestPasidRequest, {
        containerId: a.containerId,
        device: { ref: { $case: "mdevUuid", value: a.mdev } },
        hpasid: x.hpasid,
        generation: x.generation,
        gpasid: 101,
        guestPgtable: 0x3000n,
      }),
    );
    await waitFor(async () => ((await c.kvm.queryState({ vmId: a.vmId })).vms[0]?.translations.length ?? 0) === 1, { timeoutMs: 10_000 });
    await c.vdcm.writeWqPasid({ mdevUuid: a.mdev, virtualWq: 0, gpasid: 101 });
    // VM B has its own guest PASID 101 too (a different host PASID).
    const y = await b.vmm.allocPasid({ containerId: b.containerId });
    expect(y.hpasid).not.toBe(x.hpasid);

    const snapshot = async () => ({
      ioasid: (await c.core.describe({ ioasid: x.hpasid })).info,
      kvm: (await c.kvm.queryState({ vmId: a.vmId })).vms[0]?.translations,
      vfio: JSON.stringify((await c.vfio.queryState({ containerId: a.containerId })).containers, (_k, v) => (typeof v === "bigint" ? String(v) : v)),
      vdcm: (await c.vdcm.queryState({ deviceIds: ["iax0"] })).devices[0]?.pasidEntries.map((e) => ({ ...e, programmedAt: undefined })),
      iommu: JSON.stringify((await c.iommu.queryState({ deviceIds: ["iax0"], maxIotlbFlushes: 0, viommusOnly: false })).devices, (_k, v) =>
        typeof v === "bigint" ? String(v) : v,
      ),
    });
    const before = await snapshot();
    const bDevice = { ref: { $case: "mdevUuid", value: b.mdev } };

    // Through VFIO, naming A's container: B holds only its own capability, so every call is
    // PERMISSION_DENIED before anything happens, with B's capability or with none.
    const withB = { metadata: { "ioasid-vfio-capability": Buffer.from(b.vmm.capabilityOf(b.containerId)!).toString("hex") } };
    for (const [what, options] of [
      ["with B's capability", withB],
      ["with no capability", {}],
    ] as const) {
      for (const e of [
        await refused(
          b.vmm.freePasid({ containerId: a.containerId, hpasid: x.hpasid, generation: 0 }, options),
          `VM B freeing A's PASID in A's container ${what}`,
        ),
        await refused(
          b.vmm.unbindGuestPasid(
            P(vfio.UnbindGuestPasidRequest, {
              containerId: a.containerId,
              device: { ref: { $case: "mdevUuid", value: a.mdev } },
              hpasid: x.hpasid,
              gpasid: 101,
            }),
            options,
          ),
          `VM B unbinding A's PASID in A's container ${what}`,
        ),
        await refused(b.vmm.closeContainer({ containerId: a.containerId }, options), `VM B closing A's container ${what}`),
      ]) {
        expect(e.code).toBe(Code.PERMISSION_DENIED);
        expect(e.reason).toBe(what === "with no capability" ? "CAPABILITY_MISSING" : "CAPABILITY_NOT_FOR_CONTAINER");
      }
    }
    // Through VFIO with B's own container, in host numbering: free, unbind, bind (look up) A's PASID.
    await refused(b.vmm.freePasid({ containerId: b.containerId, hpasid: x.hpasid, generation: 0 }), "VM B freeing A's host PASID");
    await refused(
      b.vmm.unbindGuestPasid(P(vfio.UnbindGuestPasidRequest, { containerId: b.containerId, device: bDevice, hpasid: x.hpasid, generation: 0, gpasid: 101 })),
      "VM B unbinding A's host PASID",
    );
    await refused(
      b.vmm.bindGuestPasid(
        P(vfio.BindGuestPasidRequest, { containerId: b.containerId, device: bDevice, hpasid: x.hpasid, generation: 0, gpasid: 102, guestPgtable: 0x4000n }),
      ),
      "VM B binding A's host PASID",
    );
    // Through the core with B's set: look-ups in host and guest numbering.
    await refused(c.core.find(P(core.FindRequest, { setId: b.setId, ioasid: x.hpasid })), "B's set finding A's host PASID");
    await refused(c.core.findBySpid(P(core.FindBySpidRequest, { setId: b.setId, spid: 101 })), "B's set translating guest PASID 101 (B never bound it)");
    // Through VDCM (a guest only reaches its own mdev's registers): B's mdev programming guest
    // PASID 101, A's host PASID as a guest PASID, and a descriptor with A's host PASID.
    await refused(c.vdcm.writeWqPasid({ mdevUuid: b.mdev, virtualWq: 0, gpasid: 101 }), "VM B programming guest PASID 101");
    await refused(c.vdcm.writeWqPasid({ mdevUuid: b.mdev, virtualWq: 0, gpasid: x.hpasid }), "VM B programming A's host PASID as a guest PASID");
    const submit = await c.vdcm
      .submitDescriptor(
        P(vdcm.SubmitDescriptorRequest, {
          mdevUuid: b.mdev,
          virtualWq: 0,
          pasid: x.hpasid,
          pasidSpace: vdcm.PasidSpace.PASID_SPACE_HOST,
          descriptor: { op: vdcm.DescriptorOp.DESCRIPTOR_OP_NOOP, srcAddress: 0n, dstAddress: 0n, size: 0n },
        }),
      )
      .then(
        (r) => `completed ${vdcm.completionStatusToJSON(r.status)}`,
        (e: DomainError) => `refused ${e.reason}`,
      );
    expect(submit, "VM B submitting with A's host PASID").not.toBe("completed COMPLETION_STATUS_SUCCESS");
    // Through KVM: B's vCPU executing ENQCMD with guest PASID 101 never reaches A's host PASID.
    const enq = await c.kvm.enqcmd({ vmId: b.vmId, vcpu: 0, ia32Pasid: (0x8000_0000 | 101) >>> 0 });
    expect(enq.outcome).toBe(kvm.EnqcmdOutcome.ENQCMD_OUTCOME_GP);
    expect(enq.hpasid).not.toBe(x.hpasid);

    // Nothing of A's changed.
    expect(await snapshot()).toEqual(before);
    const again = await c.kvm.enqcmd({ vmId: a.vmId, vcpu: 0, ia32Pasid: (0x8000_0000 | 101) >>> 0 });
    expect(again).toMatchObject({ outcome: kvm.EnqcmdOutcome.ENQCMD_OUTCOME_TRANSLATED, hpasid: x.hpasid });
  }, 60_000);
});

import { core, events, iommu } from "@ioasid/proto";
import type { ChaosClients } from "./chaos-clients.js";
import type { FinalState, LiveEntry } from "@ioasid/checker";

/** The IOMMU and VDCM instance names of a chaos stack (their history records' instance). */
export interface RoleInstances {
  readonly iommu: string;
  readonly vdcm: string;
}

/**
 * Reads the state the checker wants once the run has settled: the core's GetStats, ListSets,
 * ListIoasids (with holders) and ListRegistrations, and every role's QueryState tables as live
 * entries — KVM's VMCS translations (instance `vm-<id>`), VDCM's device PASID entries, the IOMMU's
 * PASID entries and its outstanding page-request groups.
 * @throws DomainError when a service does not answer (the runner reads after healing)
 */
export async function readFinalState(c: ChaosClients, instances: RoleInstances): Promise<FinalState> {
  const [stats, sets, ioasids, regs, k, d, i] = await Promise.all([
    c.core.getStats({}),
    c.core.listSets({}),
    c.core.listIoasids({ setId: 0 }),
    c.core.listRegistrations({}),
    c.kvm.queryState({ vmId: 0 }),
    c.vdcm.queryState({ deviceIds: [] }),
    c.iommu.queryState({ deviceIds: [], maxIotlbFlushes: 0, viommusOnly: false }),
  ]);
  const liveEntries: LiveEntry[] = [];
  for (const vm of k.vms) {
    for (const t of vm.translations)
      liveEntries.push({ role: "kvm", instance: `vm-${vm.vmId}`, ioasid: t.hpasid, generation: t.generation, where: `vm ${vm.vmId} gpasid ${t.gpasid}` });
  }
  for (const dev of d.devices) {
    for (const e of dev.pasidEntries) {
      liveEntries.push({
        role: "vdcm",
        instance: instances.vdcm,
        ioasid: e.hpasid,
        ...(e.generation === 0 ? {} : { generation: e.generation }),
        where: `device ${dev.deviceId} wq ${e.wqId}`,
      });
    }
  }
  for (const dev of i.devices) {
    for (const e of dev.pasidEntries) {
      if (e.withoutPasid || e.pasid === 0) continue;
      liveEntries.push({
        role: "iommu",
        instance: instances.iommu,
        ioasid: e.pasid,
        ...(e.generation === 0 ? {} : { generation: e.generation }),
        where: `device ${dev.deviceId}`,
      });
    }
  }
  return {
    ts: Date.now(),
    capacity: stats.capacity,
    reserved: stats.capacity - stats.allocatable,
    available: stats.available,
    sets: sets.sets.map((s) => ({
      setId: s.setId,
      quota: s.quota,
      inUse: s.inUse,
      ...(s.tokenType === events.TokenType.TOKEN_TYPE_MM ? { mmToken: String(s.token) } : {}),
    })),
    ioasids: ioasids.ioasids.map((x) => ({
      ioasid: x.ioasid,
      generation: x.generation,
      setId: x.setId,
      state: x.state === core.IoasidState.IOASID_STATE_FREE_PENDING ? ("FREE_PENDING" as const) : ("ACTIVE" as const),
      refcount: x.refcount,
      ...(x.spid === 0 ? {} : { spid: x.spid }),
      holders: x.holders.flatMap((h) => Array.from({ length: h.count }, () => `${h.holder!.role}/${h.holder!.instance}/${h.holder!.purpose}`)),
    })),
    liveEntries,
    // Complete groups only: a partial group (its last request never came) is owed no response
    // (io-pgfault frees it; DESIGN §5 "Faults"), so it is not L3's outstanding group.
    faultGroups: i.faultGroups
      .filter((g) => g.state !== iommu.FaultGroupState.FAULT_GROUP_STATE_PARTIAL)
      .map((g) => ({
        faultGroupId: String(g.faultGroupId),
        instance: instances.iommu,
        ...(g.withoutPasid ? {} : { ioasid: g.pasid }),
      })),
    registrations: regs.registrations.map((r) => ({
      subscriber: r.subscriber?.name ?? "",
      instance: r.subscriber?.instance ?? "",
      ...(r.scope?.$case === "mmToken" ? { mmToken: String(r.scope.value) } : {}),
      active: r.active,
      setId: r.activeSetId,
    })),
  };
}

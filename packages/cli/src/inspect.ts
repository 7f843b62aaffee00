import { isDomainError } from "@ioasid/errors";
import { core, iommu, kvm, vdcm, vfio } from "@ioasid/proto";
import type { ServiceClients } from "./clients.js";

/** The parts of `inspect`, one per service asked: the core's namespace, then each role's tables. */
export const INSPECT_SECTIONS = ["core", "vfio", "kvm", "vdcm", "iommu"] as const;
export type InspectSection = (typeof INSPECT_SECTIONS)[number];

/** What the core answered: the namespace's figures, its sets, IOASIDs and registrations. */
export interface CoreState {
  readonly stats: core.GetStatsResponse;
  readonly sets: readonly core.IoasidSet[];
  readonly ioasids: readonly core.IoasidInfo[];
  readonly registrations: readonly core.Registration[];
}

/**
 * One look at a stack: each service's answer, or why it gave none. A service that is down leaves
 * its section out and says why in `unreachable` (issue 17: one role down failed the whole of
 * `inspect`).
 */
export interface InspectSnapshot {
  readonly core?: CoreState;
  readonly vfio?: vfio.QueryStateResponse;
  readonly kvm?: kvm.QueryStateResponse;
  readonly vdcm?: vdcm.QueryStateResponse;
  readonly iommu?: iommu.QueryStateResponse;
  /** The sections whose service did not answer, with the error it gave. */
  readonly unreachable: Partial<Record<InspectSection, string>>;
}

/** Why a call failed, on one line: the reason and message of a DomainError (UNAVAILABLE: …). */
function why(err: unknown): string {
  const text = isDomainError(err) ? `${err.reason}: ${err.message}` : err instanceof Error ? err.message : String(err);
  // grpc-js ends a connection failure with an empty "Resolution note: ".
  return text
    .split("\n")[0]!
    .replace(/\s*Resolution note:\s*$/, "")
    .trim();
}

/**
 * Asks every service for its state at once; a service that does not answer (within the clients'
 * deadline) is marked unreachable and the others are still shown.
 */
export async function gatherInspect(c: ServiceClients): Promise<InspectSnapshot> {
  const [coreState, f, k, d, i] = await Promise.allSettled([
    Promise.all([c.core.getStats({}), c.core.listSets({}), c.core.listIoasids({ setId: 0 }), c.core.listRegistrations({})]).then(
      ([stats, sets, ioasids, regs]): CoreState => ({ stats, sets: sets.sets, ioasids: ioasids.ioasids, registrations: regs.registrations }),
    ),
    c.vfio.queryState({ containerId: 0 }),
    c.kvm.queryState({ vmId: 0 }),
    c.vdcm.queryState({ deviceIds: [] }),
    c.iommu.queryState({ deviceIds: [], maxIotlbFlushes: 8, viommusOnly: false }),
  ]);
  const unreachable: Partial<Record<InspectSection, string>> = {};
  const take = <T>(section: InspectSection, r: PromiseSettledResult<T>): T | undefined => {
    if (r.status === "fulfilled") return r.value;
    unreachable[section] = why(r.reason);
    return undefined;
  };
  const snapshot = {
    core: take("core", coreState),
    vfio: take("vfio", f),
    kvm: take("kvm", k),
    vdcm: take("vdcm", d),
    iommu: take("iommu", i),
  };
  return { ...Object.fromEntries(Object.entries(snapshot).filter(([, v]) => v !== undefined)), unreachable };
}

/** A repeated field of a message's proto3 JSON: [] when empty (the mapping omits fields at their default). */
const field = (message: unknown, name: string): unknown => (message as Record<string, unknown>)[name] ?? [];

/**
 * `inspect --json`: each section in the proto3 JSON mapping of its response, `null` for a service
 * that did not answer, and `unreachable` (always present) naming those with their error.
 */
export function inspectJson(s: InspectSnapshot): Record<string, unknown> {
  return {
    stats: s.core === undefined ? null : core.GetStatsResponse.toJSON(s.core.stats),
    sets: s.core === undefined ? null : field(core.ListSetsResponse.toJSON({ sets: [...s.core.sets] }), "sets"),
    ioasids: s.core === undefined ? null : field(core.ListIoasidsResponse.toJSON({ ioasids: [...s.core.ioasids] }), "ioasids"),
    registrations: s.core === undefined ? null : field(core.ListRegistrationsResponse.toJSON({ registrations: [...s.core.registrations] }), "registrations"),
    vfio: s.vfio === undefined ? null : vfio.QueryStateResponse.toJSON(s.vfio),
    kvm: s.kvm === undefined ? null : kvm.QueryStateResponse.toJSON(s.kvm),
    vdcm: s.vdcm === undefined ? null : vdcm.QueryStateResponse.toJSON(s.vdcm),
    iommu: s.iommu === undefined ? null : iommu.QueryStateResponse.toJSON(s.iommu),
    unreachable: s.unreachable,
  };
}

/** An enum's JSON name without its type's prefix (`DOMAIN_TYPE_NESTED` → `NESTED`). */
export const enumName = (name: string, prefix: string) => name.replace(prefix, "");
const hex = (n: bigint | number) => `0x${n.toString(16)}`;

/**
 * An attach handle's owner data as a person reads it: the text it is (VFIO's is JSON naming its
 * container and device), or hex when it is not printable — never one line per byte.
 */
export function describeOwnerData(data: Uint8Array): string {
  if (data.length === 0) return "-";
  const text = new TextDecoder("utf-8", { fatal: false }).decode(data);
  // eslint-disable-next-line no-control-regex
  if (!text.includes("\uFFFD") && !/[\u0000-\u0008\u000e-\u001f]/.test(text)) return text;
  return `0x${Buffer.from(data).toString("hex")}`;
}

/** The lines of the IOMMU's tables: devices and their PASID tables, domains, attach handles, bonds, fault groups, flushes. */
export function describeIommu(i: iommu.QueryStateResponse): string[] {
  const out: string[] = [];
  for (const d of i.devices) {
    const fn = enumName(iommu.deviceFunctionToJSON(d.function), "DEVICE_FUNCTION_");
    out.push(
      `  device ${d.deviceId}  ${fn}${d.parentDeviceId === "" ? "" : ` of ${d.parentDeviceId}`}  group ${d.iommuGroup}  max PASIDs ${d.maxPasids}` +
        `  ${d.priCapable ? `PRI (${d.outstandingPageRequests}/${d.priCredits} page requests outstanding)` : "no PRI"}`,
    );
    if (d.pasidEntries.length === 0) out.push("    PASID table: empty");
    for (const e of d.pasidEntries) {
      const pasid = e.withoutPasid ? "RID_PASID" : `PASID ${e.pasid}`;
      const guest = e.setId === 0 ? "" : `  set ${e.setId} gpasid ${e.gpasid}`;
      out.push(
        `    ${pasid.padEnd(12)} ${enumName(iommu.domainTypeToJSON(e.domainType), "DOMAIN_TYPE_")} domain ${e.domainId}  handle ${e.handleId}${guest}` +
          `${e.generation === 0 ? "" : `  gen ${e.generation}`}${e.faultReporting ? "" : "  faults not reported"}`,
      );
    }
  }
  if (i.domains.length > 0) out.push("  domains");
  for (const d of i.domains) {
    const type = enumName(iommu.domainTypeToJSON(d.type), "DOMAIN_TYPE_");
    const extra = [
      d.parentDomainId === 0 ? undefined : `stage 2 domain ${d.parentDomainId}`,
      d.guestPgtable === 0n ? undefined : `guest page table ${hex(d.guestPgtable)}`,
      d.mmToken === 0n ? undefined : `mm ${d.mmToken}`,
      d.mappings.length === 0 ? undefined : `${d.mappings.length} mapping(s)`,
    ].filter((x) => x !== undefined);
    out.push(`    domain ${d.domainId}  ${type}  ${d.attachCount} handle(s)${extra.length === 0 ? "" : `  ${extra.join(", ")}`}`);
  }
  if (i.attachHandles.length > 0) out.push("  attach handles");
  for (const h of i.attachHandles) {
    const where = h.withoutPasid ? `${h.deviceId} RID_PASID` : `${h.deviceId} PASID ${h.pasid}`;
    const guest = h.setId === 0 ? "" : `  set ${h.setId} gpasid ${h.gpasid}`;
    out.push(
      `    handle ${h.handleId}  ${enumName(iommu.attachKindToJSON(h.kind), "ATTACH_KIND_")}  ${where} -> domain ${h.domainId}${guest}` +
        `  owner ${h.owner || "-"} ${describeOwnerData(h.ownerData)}${h.outstandingFaultGroups === 0 ? "" : `  ${h.outstandingFaultGroups} fault group(s) outstanding`}`,
    );
  }
  if (i.svaBonds.length > 0) out.push("  SVA bonds");
  for (const b of i.svaBonds) out.push(`    ${b.deviceId} mm ${b.mmToken}  PASID ${b.pasid}  domain ${b.domainId}  handle ${b.handleId}  users ${b.users}`);
  if (i.faultGroups.length > 0) out.push("  fault groups");
  for (const g of i.faultGroups) {
    const state = enumName(iommu.faultGroupStateToJSON(g.state), "FAULT_GROUP_STATE_");
    out.push(
      `    group ${g.faultGroupId}  ${g.deviceId} ${g.withoutPasid ? "RID_PASID" : `PASID ${g.pasid}`} prgi ${g.prgi}  ${g.requests.length} request(s)  ${state}  owner ${g.owner || "-"}`,
    );
  }
  if (i.iotlbFlushes.length > 0) out.push("  recent IOTLB flushes");
  for (const f of i.iotlbFlushes) {
    const scope = enumName(iommu.iotlbFlushScopeToJSON(f.scope), "IOTLB_FLUSH_SCOPE_");
    const cause = enumName(iommu.iotlbFlushCauseToJSON(f.cause), "IOTLB_FLUSH_CAUSE_");
    out.push(
      `    #${f.seq}  ${scope} ${cause}  domain ${f.domainId}${f.pasid === 0 ? "" : ` PASID ${f.pasid}`}${f.deviceTlb ? ` +devtlb ${f.deviceId}` : ""}${f.size === 0n ? "" : ` ${hex(f.address)}+${hex(f.size)}`}`,
    );
  }
  return out;
}

/** `inspect`'s report for a person: every section, an unreachable one as `kvm: UNREACHABLE (why)`. */
export function renderInspectText(s: InspectSnapshot): string {
  const out: string[] = [];
  const down = (section: InspectSection, title: string) => {
    const reason = s.unreachable[section];
    if (reason === undefined) return false;
    out.push(`\n${title}\n  ${section}: UNREACHABLE (${reason})`);
    return true;
  };
  if (!down("core", "IOASID namespace") && s.core !== undefined) {
    const { stats, sets, ioasids, registrations } = s.core;
    out.push(
      `IOASID namespace: capacity ${stats.capacity}, in use ${stats.inUse}, available quota ${stats.available}, last event ${stats.lastSeq}, deliveries pending ${stats.deliveriesPending}, missed ${stats.deliveriesMissed}`,
    );
    out.push("\nsets");
    for (const x of sets) out.push(`  set ${x.setId}  token ${x.token}  quota ${x.quota}  in use ${x.inUse}${x.freeing ? "  FREEING" : ""}`);
    out.push("\nIOASIDs");
    for (const x of ioasids) {
      const holders = x.holders.map((h) => `${h.holder!.role}/${h.holder!.instance}/${h.holder!.purpose}${h.count > 1 ? `×${h.count}` : ""}`).join(", ");
      out.push(
        `  ${String(x.ioasid).padStart(7)}  set ${x.setId}  gen ${x.generation}  ${enumName(core.ioasidStateToJSON(x.state), "IOASID_STATE_")}  spid ${x.spid || "-"}  refs ${x.refcount}: ${holders}`,
      );
    }
    out.push("\nregistrations");
    for (const r of registrations)
      out.push(
        `  #${r.registrationId} ${r.subscriber!.name}/${r.subscriber!.instance}  ${r.scope?.$case}=${String(r.scope?.value)}  ${r.active ? "active" : "PENDING"}`,
      );
  }
  if (!down("vfio", "vfio containers") && s.vfio !== undefined) {
    out.push("\nvfio containers");
    for (const x of s.vfio.containers)
      out.push(
        `  container ${x.containerId}  set ${x.setId}  ${x.vmName}  ${vfio.containerStateToJSON(x.state)}  pasids ${x.pasids.map((p) => p.hpasid).join(",") || "-"}` +
          `  host memory ${x.guestMemory.map((r) => `${hex(r.paddr)}..${hex(r.paddr + r.size - 1n)}`).join(",") || "-"}`,
        // Its vIOMMUs (issue 16): the guest-visible virt_id of each vdevice, the event queues' depth.
        ...x.viommus.map(
          (v) =>
            `    viommu ${v.viommuId} via ${v.device?.ref?.value ?? "?"} over domain ${v.parentDomainId}` +
            `  vdevices ${v.vdevices.map((d) => `${d.vdeviceId}(${d.device?.ref?.value ?? "?"}=${hex(d.virtId)})`).join(", ") || "-"}` +
            `  eventqs ${v.veventqs.map((q) => `${q.veventqId}(depth ${q.depth})`).join(", ") || "-"}`,
        ),
      );
  }
  if (!down("kvm", "kvm VMCS PASID translation tables") && s.kvm !== undefined) {
    out.push("\nkvm VMCS PASID translation tables");
    for (const vm of s.kvm.vms)
      out.push(`  vm ${vm.vmId} (${vm.vmName}, set ${vm.setId}): ${vm.translations.map((t) => `${t.gpasid}->${t.hpasid}`).join(", ") || "empty"}`);
  }
  if (!down("vdcm", "vdcm devices") && s.vdcm !== undefined) {
    out.push("\nvdcm devices");
    for (const dev of s.vdcm.devices)
      out.push(`  ${dev.deviceId}: PASID entries ${dev.pasidEntries.map((e) => `${e.hpasid}(wq${e.wqId}, set ${e.setId})`).join(", ") || "none"}`);
    for (const m of s.vdcm.mdevs) out.push(`  mdev ${m.mdevUuid} on ${m.parentDeviceId} wqs ${m.wqIds.join(",")} set ${m.setId || "-"}`);
  }
  if (!down("iommu", "iommu") && s.iommu !== undefined) {
    out.push("\niommu");
    out.push(...describeIommu(s.iommu));
  }
  const missing = Object.keys(s.unreachable);
  if (missing.length > 0) out.push(`\n${missing.length} of ${INSPECT_SECTIONS.length} services unreachable: ${missing.join(", ")}`);
  return out.join("\n").replace(/^\n/, "");
}

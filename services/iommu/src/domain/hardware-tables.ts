import {
  AttachKind,
  type DeviceSpec,
  type DeviceView,
  type Domain,
  type PasidEntry,
  type SvaBond,
  type AttachHandle,
  type DomainType,
  type GpasidBinding,
  type IommuHardwareKeptEntry,
  type IommuKeptEntry,
  type KeptDomain,
  type KeptGpasidBinding,
  type KeptMmContext,
  type Mapping,
  type MmContext,
} from "./iommu-hardware-model.js";
import { copyMapping, lowerBound } from "./io-page-table.js";

// The hardware's tables as data, and their persistence seam: what IommuHardware keeps in its store
// (one entry per key) and how the tables are rebuilt from it after a crash (DESIGN §4: the role's
// kept state), and the views of their rows. The class owns the tables and their rules; this module
// only reads, copies and rebuilds them.

/** A registered device and its PASID table. */
export interface DeviceState {
  readonly spec: DeviceSpec;
  /** PASID → handle id; RID_PASID (0) is the entry of requests without PASID. */
  readonly entries: Map<number, bigint>;
}

/** A domain, its attach count and its I/O page table. */
export interface DomainState {
  readonly domainId: number;
  readonly type: DomainType;
  readonly parentDomainId: number;
  readonly guestPgtable: bigint;
  readonly mmToken: bigint;
  readonly implicit: boolean;
  attachCount: number;
  mappings: Mapping[];
}

/** An attach handle and whether faults are reported for it. */
export interface HandleState extends AttachHandle {
  faultReporting: boolean;
}

/** One device's SVA bond to an mm: its handle and users. */
export interface BondState {
  readonly handleId: bigint;
  users: number;
}

/** An mm context with its SVA domain and bonds. */
export interface MmState extends MmContext {
  domainId: number;
  readonly bonds: Map<string, BondState>;
}

/** The store key of the first-stage range of the guest bind of `hpasid` that starts at `iova`. */
export function guestMappingKey(hpasid: number, iova: bigint): string {
  return `gp/${hpasid}/${iova.toString(16)}`;
}

/** `<hpasid>/<iova in hex>` (a `gp/` key after its kind) as numbers. */
function parseGuestMappingKey(id: string): [number, bigint] {
  const slash = id.indexOf("/");
  return [Number(id.slice(0, slash)), BigInt(`0x${id.slice(slash + 1)}`)];
}

/** The kept tables of the modelled hardware (the IOTLB flush log is not kept). */
export interface HardwareTables {
  readonly devices: Map<string, DeviceState>;
  readonly domains: Map<number, DomainState>;
  readonly handles: Map<bigint, HandleState>;
  readonly bindings: Map<number, GpasidBinding>;
  readonly mms: Map<bigint, MmState>;
  nextDomainId: number;
  nextHandleId: bigint;
}

/** Tables with nothing in them. */
export function emptyTables(): HardwareTables {
  return { devices: new Map(), domains: new Map(), handles: new Map(), bindings: new Map(), mms: new Map(), nextDomainId: 1, nextHandleId: 1n };
}

/**
 * The tables rebuilt from what the store held (devices first, then what refers to them; an attach
 * handle whose device or domain is gone is dropped). `watch` wraps each guest bind state so that
 * the driver's later updates mark it changed.
 * @returns the keys to write again: a first stage read from its bind's entry (state written before
 *   each range had a key of its own) is kept under its ranges' keys, then the bind without it — in
 *   that order, so that a crash between the two leaves the table in one place or both (both: each
 *   range is read once)
 */
export function loadTables(t: HardwareTables, saved: ReadonlyMap<string, IommuKeptEntry>, watch: (b: GpasidBinding) => GpasidBinding): string[] {
  const kept = [...saved.values()];
  const rewrite: string[] = [];
  for (const v of kept) {
    if (v.kind !== "device") continue;
    const d = v.device;
    const spec: DeviceSpec = {
      deviceId: d.deviceId,
      maxPasids: d.maxPasids,
      priCapable: d.priCapable,
      function: d.function,
      parentDeviceId: d.parentDeviceId,
      iommuGroup: d.iommuGroup,
      priCredits: d.priCredits,
    };
    t.devices.set(spec.deviceId, { spec, entries: new Map() });
  }
  for (const v of kept) {
    if (v.kind !== "domain") continue;
    const d = v.domain;
    t.domains.set(d.domainId, {
      domainId: d.domainId,
      type: d.type,
      parentDomainId: d.parentDomainId,
      guestPgtable: d.guestPgtable,
      mmToken: d.mmToken,
      implicit: d.implicit,
      attachCount: 0,
      mappings: d.mappings.map(copyMapping),
    });
  }
  for (const v of kept) {
    if (v.kind !== "gpasidBinding") continue;
    const b = v.binding;
    t.bindings.set(
      b.hpasid,
      watch({
        hpasid: b.hpasid,
        setId: b.setId,
        generation: b.generation,
        gpasid: b.gpasid,
        devices: new Set(),
        refHeld: b.refHeld,
        spidAttached: b.spidAttached,
        firstStage: b.firstStage.map(copyMapping),
      }),
    );
  }
  for (const b of t.bindings.values()) {
    if (b.firstStage.length === 0) continue;
    for (const m of b.firstStage) rewrite.push(guestMappingKey(b.hpasid, m.iova));
    rewrite.push(`bind/${b.hpasid}`);
  }
  // Each range of a first stage kept on its own (older state has them in the bind's entry instead).
  const ranges = new Map<number, Mapping[]>();
  for (const [key, v] of saved) {
    if (v.kind !== "guestMapping") continue;
    const g = v.guestMapping;
    if (t.bindings.get(g.hpasid)?.generation !== g.generation) {
      rewrite.push(key); // left by a bind that is gone (or an older one of the PASID): deleted
      continue;
    }
    let list = ranges.get(g.hpasid);
    if (list === undefined) ranges.set(g.hpasid, (list = []));
    list.push(copyMapping(g.mapping));
  }
  for (const [hpasid, list] of ranges) {
    const b = t.bindings.get(hpasid)!;
    // A range both in the bind's entry and under its own key (a start that stopped between writing
    // the ranges and the bind without them) is one range: its own key's, written later, wins.
    const byIova = new Map<bigint, Mapping>();
    for (const m of [...b.firstStage, ...list]) byIova.set(m.iova, m);
    b.firstStage = [...byIova.values()].sort((x, y) => (x.iova < y.iova ? -1 : x.iova > y.iova ? 1 : 0));
  }
  for (const v of kept) {
    if (v.kind !== "attachHandle") continue;
    const dev = t.devices.get(v.handle.deviceId);
    const d = t.domains.get(v.handle.domainId);
    if (dev === undefined || d === undefined) continue;
    const h: HandleState = { ...snapshotHandle(v.handle), faultReporting: v.handle.faultReporting };
    t.handles.set(h.handleId, h);
    dev.entries.set(h.pasid, h.handleId);
    d.attachCount++;
    if (h.kind === AttachKind.GPASID_BIND) t.bindings.get(h.pasid)?.devices.add(h.deviceId);
  }
  for (const v of kept) {
    if (v.kind !== "mmContext") continue;
    const m = v.mm;
    t.mms.set(m.mmToken, {
      mmToken: m.mmToken,
      setId: m.setId,
      pasid: m.pasid,
      generation: m.generation,
      domainId: m.domainId,
      bonds: new Map(m.bonds.map((b) => [b.deviceId, { handleId: b.handleId, users: b.users }])),
    });
  }
  for (const v of kept) {
    if (v.kind !== "idCounters") continue;
    t.nextDomainId = Math.max(t.nextDomainId, v.nextDomainId);
    if (v.nextHandleId > t.nextHandleId) t.nextHandleId = v.nextHandleId;
  }
  return rewrite;
}

/** The kept entry now under a store key (`dev/<id>`, `dom/<id>`, `h/<id>`, `bind/<hpasid>`, `gp/<hpasid>/<iova>`, `mm/<token>`, `ids`), undefined: deleted. */
export function keptEntryOf(t: HardwareTables, key: string): IommuHardwareKeptEntry | undefined {
  const slash = key.indexOf("/");
  const kind = slash < 0 ? key : key.slice(0, slash);
  const id = key.slice(slash + 1);
  switch (kind) {
    case "ids":
      return { kind: "idCounters", nextDomainId: t.nextDomainId, nextHandleId: t.nextHandleId };
    case "dev": {
      const spec = t.devices.get(id)?.spec;
      return spec === undefined ? undefined : { kind: "device", device: spec };
    }
    case "dom": {
      const d = t.domains.get(Number(id));
      if (d === undefined) return undefined;
      const domain: KeptDomain = {
        domainId: d.domainId,
        type: d.type,
        parentDomainId: d.parentDomainId,
        guestPgtable: d.guestPgtable,
        mmToken: d.mmToken,
        implicit: d.implicit,
        mappings: d.mappings.map(copyMapping),
      };
      return { kind: "domain", domain };
    }
    case "h": {
      const h = t.handles.get(BigInt(id));
      return h === undefined ? undefined : { kind: "attachHandle", handle: { ...snapshotHandle(h), faultReporting: h.faultReporting } };
    }
    case "bind": {
      const b = t.bindings.get(Number(id));
      if (b === undefined) return undefined;
      const binding: KeptGpasidBinding = {
        hpasid: b.hpasid,
        setId: b.setId,
        generation: b.generation,
        gpasid: b.gpasid,
        refHeld: b.refHeld,
        spidAttached: b.spidAttached,
        // Each range is an entry of its own (`gp/…`): the bind's entry no longer grows with its table.
        firstStage: [],
      };
      return { kind: "gpasidBinding", binding };
    }
    case "gp": {
      const [hpasid, iova] = parseGuestMappingKey(id);
      const b = t.bindings.get(hpasid);
      const m = b === undefined ? undefined : b.firstStage[lowerBound(b.firstStage, iova)];
      return b === undefined || m === undefined || m.iova !== iova
        ? undefined
        : { kind: "guestMapping", guestMapping: { hpasid, generation: b.generation, mapping: copyMapping(m) } };
    }
    case "mm": {
      const m = t.mms.get(BigInt(id));
      if (m === undefined) return undefined;
      const mm: KeptMmContext = {
        mmToken: m.mmToken,
        setId: m.setId,
        pasid: m.pasid,
        generation: m.generation,
        domainId: m.domainId,
        bonds: [...m.bonds].map(([deviceId, b]) => ({ deviceId, handleId: b.handleId, users: b.users })),
      };
      return { kind: "mmContext", mm };
    }
    default:
      return undefined;
  }
}

/** A copy of a handle (its owner data too), without what only the tables keep. */
export function snapshotHandle(h: AttachHandle): AttachHandle {
  return {
    handleId: h.handleId,
    kind: h.kind,
    domainId: h.domainId,
    deviceId: h.deviceId,
    pasid: h.pasid,
    withoutPasid: h.withoutPasid,
    owner: h.owner,
    ownerData: Uint8Array.from(h.ownerData),
    setId: h.setId,
    gpasid: h.gpasid,
    generation: h.generation,
    createdAt: h.createdAt,
  };
}

// ---- views: copies of the tables' rows as the callers see them ----

/** The PASID table entry of a handle, as the device sees it. */
export function entryView(t: HardwareTables, h: HandleState): PasidEntry {
  return {
    pasid: h.pasid,
    withoutPasid: h.withoutPasid,
    domainId: h.domainId,
    domainType: t.domains.get(h.domainId)!.type,
    handleId: h.handleId,
    setId: h.setId,
    gpasid: h.gpasid,
    generation: h.generation,
    faultReporting: h.faultReporting,
  };
}

/** A device with its PASID table, ascending by PASID. */
export function deviceView(t: HardwareTables, dev: DeviceState): DeviceView {
  const keys = [...dev.entries.keys()].sort((a, b) => a - b);
  return { ...dev.spec, pasidEntries: keys.map((k) => entryView(t, t.handles.get(dev.entries.get(k)!)!)) };
}

/** A copy of a domain (its mappings too). */
export function domainView(d: DomainState): Domain {
  return {
    domainId: d.domainId,
    type: d.type,
    parentDomainId: d.parentDomainId,
    guestPgtable: d.guestPgtable,
    mmToken: d.mmToken,
    attachCount: d.attachCount,
    mappings: d.mappings.map((m) => ({ ...m, access: { ...m.access } })),
    implicit: d.implicit,
  };
}

/** One device's bond to an mm. */
export function bondView(mm: MmState, deviceId: string, bond: BondState): SvaBond {
  return { deviceId, mmToken: mm.mmToken, pasid: mm.pasid, handleId: bond.handleId, domainId: mm.domainId, users: bond.users };
}

import { vfio } from "@ioasid/proto";
import type { StackClients } from "./clients.js";
import type { FaultCommand, FaultCommandContext, VmRef } from "./fault-commands.js";
import { parseCount, parseU64, parseVerb, requireString, UsageError } from "./usage-error.js";

// `ioasidctl viommu`: a VM's vIOMMU (issue 16 item 5; DESIGN §5 "iommufd model") — allocated over
// the VM's stage 2, its vdevices (a device's guest-visible virt_id), its event queue of DMA faults
// (read with LOST_EVENTS markers for an overflow) and their destruction. Every call goes through
// VFIO with the VM's capability, as every VM command does: the objects are the VM's container's.

const dirOption = { dir: { type: "string", default: ".ioasid" } } as const;
const hex = (n: bigint) => `0x${n.toString(16)}`;
const VERBS = ["alloc", "vdevice", "eventq", "read", "destroy"] as const;
type Verb = (typeof VERBS)[number];

/** Deepest event queue the IOMMU accepts (iommu.proto AllocVeventq). */
const MAX_DEPTH = 4096;
/** Largest object id (uint32). */
const MAX_ID = 0xffff_ffff;

const USAGE =
  "ioasidctl viommu alloc --vm NAME --device DEV [--json]\n" +
  "  allocates a vIOMMU over the VM's stage 2 (VFIO AllocViommu), through an assigned physical device of the\n" +
  "  IOMMU instance it virtualises.\n" +
  "ioasidctl viommu vdevice --vm NAME --viommu ID --device DEV --virt-id V [--json]\n" +
  "  tells the vIOMMU the id the guest knows an assigned device by (VFIO AllocVdevice): its events carry V, never\n" +
  "  the host's device id. A virt_id is unique per vIOMMU.\n" +
  "ioasidctl viommu eventq --vm NAME --viommu ID --depth D [--json]\n" +
  "  creates the vIOMMU's DMA-fault event queue, D (1..4096) events deep (VFIO AllocVeventq). Faults of a device\n" +
  "  nested on the vIOMMU (`device replace --guest-pgtable ADDR --viommu ID`) are queued there.\n" +
  "ioasidctl viommu read --vm NAME --eventq ID [--max N] [--json]\n" +
  "  takes up to N (0 = all) items off the queue, oldest first (VFIO ReadVeventq): one line per event (seq,\n" +
  "  virt_id, address, reason), and `lost FIRST..LAST (COUNT events)` where the queue overflowed.\n" +
  "ioasidctl viommu destroy --vm NAME (--eventq ID | --vdevice ID | --viommu ID)\n" +
  "  destroys one object (VFIO DestroyVeventq/DestroyVdevice/DestroyViommu). Destroy in order: event queue and\n" +
  "  vdevices before the vIOMMU, a device's nested domain replaced away before its vdevice (else exit 1,\n" +
  "  VIOMMU_IN_USE / VDEVICE_IN_USE). Closing the VM destroys them all.";

/** An object id flag: 1..2^32-1. @throws UsageError */
function parseId(v: string | boolean | undefined, flag: string): number {
  const n = parseCount(v, flag, MAX_ID);
  if (n === 0) throw new UsageError(`--${flag} must be an id (1..${MAX_ID}), got 0`);
  return n;
}

/** What one verb asks for, parsed and checked before anything is sent. */
type Request =
  | { readonly verb: "alloc"; readonly deviceId: string }
  | { readonly verb: "vdevice"; readonly viommuId: number; readonly deviceId: string; readonly virtId: bigint }
  | { readonly verb: "eventq"; readonly viommuId: number; readonly depth: number }
  | { readonly verb: "read"; readonly veventqId: number; readonly max: number }
  | { readonly verb: "destroy"; readonly what: "eventq" | "vdevice" | "viommu"; readonly id: number };

/**
 * Parses a `viommu` command line (verb and flags) into its request: every bad flag is a UsageError
 * (exit 2) before the stack is reached.
 * @throws UsageError
 */
export function parseViommuRequest(v: Record<string, string | boolean | undefined>, positionals: readonly string[]): Request {
  const verb: Verb = parseVerb(positionals, VERBS, "ioasidctl viommu");
  const device = () => requireString(v["device"], "device", "an assigned physical device, e.g. 0000:6a:01.0");
  switch (verb) {
    case "alloc":
      return { verb, deviceId: device() };
    case "vdevice":
      return { verb, viommuId: parseId(v["viommu"], "viommu"), deviceId: device(), virtId: parseU64(v["virt-id"], "virt-id") };
    case "eventq": {
      const depth = parseCount(v["depth"], "depth", MAX_DEPTH);
      if (depth === 0) throw new UsageError(`--depth must be 1..${MAX_DEPTH}, got 0`);
      return { verb, viommuId: parseId(v["viommu"], "viommu"), depth };
    }
    case "read":
      return { verb, veventqId: parseId(v["eventq"], "eventq"), max: v["max"] === undefined ? 0 : parseCount(v["max"], "max", MAX_ID) };
    case "destroy": {
      const named = (["eventq", "vdevice", "viommu"] as const).filter((f) => v[f] !== undefined);
      if (named.length !== 1) throw new UsageError("give exactly one of --eventq ID, --vdevice ID, --viommu ID");
      const what = named[0]!;
      return { verb, what, id: parseId(v[what], what) };
    }
  }
}

/** The `viommu` command, for main.ts's command table. */
export function viommuCommands(ctx: FaultCommandContext): Record<string, FaultCommand> {
  return {
    viommu: {
      summary: "a VM's vIOMMU: `viommu alloc|vdevice|eventq|read|destroy` (vdevices, DMA-fault event queue, LOST_EVENTS)",
      usage: USAGE,
      options: {
        ...dirOption,
        vm: { type: "string" },
        device: { type: "string" },
        viommu: { type: "string" },
        vdevice: { type: "string" },
        eventq: { type: "string" },
        "virt-id": { type: "string" },
        depth: { type: "string" },
        max: { type: "string" },
        json: { type: "boolean", default: false },
      },
      run: async (v, pos) => {
        const req = parseViommuRequest(v, pos);
        const dir = v["dir"] as string;
        const vm = ctx.findVm(dir, v["vm"] as string | undefined);
        return ctx.withStack(dir, (c) => runRequest(c, req, vm, v["json"] === true, ctx));
      },
    },
  };
}

/** One event queue item as a line: `seq N virt_id 0x… address 0x… REASON` or `lost A..B (N events)`. */
export function describeVeventqItem(it: vfio.VeventqItem): string {
  const item = it.item;
  if (item === undefined) return "?";
  if (item.$case === "lostEvents") {
    const { firstSequence: first, count } = item.value;
    return `lost ${first}..${first + count - 1n} (${count} event${count === 1n ? "" : "s"}): the queue overflowed`;
  }
  const e = item.value;
  const pasid = e.withoutPasid ? "no PASID" : `pasid ${e.pasid}`;
  return `seq ${e.sequence} virt_id ${hex(e.virtId)} ${pasid} address ${hex(e.address)} ${e.reason.replace(/^FAULT_REASON_/, "")}`;
}

async function runRequest(c: StackClients, req: Request, vm: VmRef, json: boolean, ctx: FaultCommandContext): Promise<number> {
  const containerId = vm.containerId;
  const pci = (deviceId: string) => ({ ref: { $case: "deviceId" as const, value: deviceId } });
  switch (req.verb) {
    case "alloc": {
      const r = await c.vfio.allocViommu(vfio.AllocViommuRequest.fromPartial({ containerId, device: pci(req.deviceId) }));
      const x = r.viommu!;
      if (json) ctx.out(JSON.stringify(vfio.Viommu.toJSON(x)));
      else ctx.out(`viommu ${x.viommuId} of vm ${vm.name}: over stage 2 domain ${x.parentDomainId}, through device ${req.deviceId}`);
      return 0;
    }
    case "vdevice": {
      const r = await c.vfio.allocVdevice(
        vfio.AllocVdeviceRequest.fromPartial({ containerId, viommuId: req.viommuId, device: pci(req.deviceId), virtId: req.virtId }),
      );
      const d = r.vdevice!;
      if (json) ctx.out(JSON.stringify(vfio.Vdevice.toJSON(d)));
      else ctx.out(`vdevice ${d.vdeviceId} in viommu ${req.viommuId}: device ${req.deviceId} is virt_id ${hex(d.virtId)} to the guest`);
      return 0;
    }
    case "eventq": {
      const r = await c.vfio.allocVeventq({ containerId, viommuId: req.viommuId, depth: req.depth });
      const q = r.veventq!;
      if (json) ctx.out(JSON.stringify(vfio.Veventq.toJSON(q)));
      else ctx.out(`eventq ${q.veventqId} on viommu ${req.viommuId}: DMA faults, ${q.depth} deep`);
      return 0;
    }
    case "read": {
      const r = await c.vfio.readVeventq({ containerId, veventqId: req.veventqId, maxItems: req.max });
      if (json) for (const it of r.items) ctx.out(JSON.stringify(vfio.VeventqItem.toJSON(it)));
      else for (const it of r.items) ctx.out(describeVeventqItem(it));
      ctx.err(`${r.items.length} item(s) read from eventq ${req.veventqId}`);
      return 0;
    }
    case "destroy":
      if (req.what === "eventq") await c.vfio.destroyVeventq({ containerId, veventqId: req.id });
      else if (req.what === "vdevice") await c.vfio.destroyVdevice({ containerId, vdeviceId: req.id });
      else await c.vfio.destroyViommu({ containerId, viommuId: req.id });
      ctx.out(`${req.what} ${req.id} of vm ${vm.name} destroyed`);
      return 0;
  }
}

import { iommu, vfio } from "@ioasid/proto";
import type { StackClients } from "./clients.js";
import type { FaultCommand, FaultCommandContext, VmRef } from "./fault-commands.js";
import { parseCount, parseU64, requireString, UsageError } from "./usage-error.js";

// `ioasidctl device`: a physical device of a VM — registered at the IOMMU, assigned through VFIO,
// and its requests without PASID replaced between the VM's stage 2 and a nested domain over it
// (issue 16 item 5: the iommufd replace through the whole tool). The VMM's calls go through VFIO
// with the VM's capability, as every VM command does.

const dirOption = { dir: { type: "string", default: ".ioasid" } } as const;
const hex = (n: bigint) => `0x${n.toString(16)}`;
const VERBS = ["register", "assign", "replace", "unassign"] as const;
type Verb = (typeof VERBS)[number];

const USAGE =
  "ioasidctl device register --device DEV [--max-pasids 1048576] [--no-pri]\n" +
  "  plugs a PF into the IOMMU (RegisterDevice) with an empty PASID table.\n" +
  "ioasidctl device assign --vm NAME --device DEV\n" +
  "  assigns it to the VM (VFIO AssignDevice): its requests without PASID translate through the VM's stage 2.\n" +
  "ioasidctl device replace --vm NAME --device DEV (--guest-pgtable ADDR [--viommu ID] | --stage2) [--json]\n" +
  "  replaces in one step what its requests without PASID translate through (VFIO ReplaceDeviceDomain → IOMMU\n" +
  "  ReplaceDomain): --guest-pgtable turns the guest's nested translation on (a NESTED domain over the stage 2 with\n" +
  "  that first-stage table; with --viommu, allocated on that vIOMMU of the VM, which needs the device's vdevice\n" +
  "  in it, and its DMA faults go to the vIOMMU's event queue), --stage2 turns it off. Fault groups outstanding on\n" +
  "  the old attachment are answered INVALID; a replace that fails leaves the old domain attached (exit 1, reason\n" +
  "  printed).\n" +
  "ioasidctl device unassign --vm NAME --device DEV\n" +
  "  takes it back (its guest binds unbound first; a nested domain detached and freed).";

function parseVerb(positionals: string[]): Verb {
  const v = positionals[0];
  if (positionals.length !== 1 || !VERBS.includes(v as Verb))
    throw new UsageError(
      `the verb is one of ${VERBS.join("|")}: ioasidctl device ${VERBS.join("|")} …${positionals.length === 0 ? "" : ` (got "${positionals.join(" ")}")`}`,
    );
  return v as Verb;
}

/** The guest page table of `device replace`: --guest-pgtable ADDR (non-zero) or --stage2 (0). */
export function parseReplaceTarget(v: Record<string, string | boolean | undefined>): bigint {
  const stage2 = v["stage2"] === true;
  const table = v["guest-pgtable"];
  if (stage2 === (table !== undefined)) throw new UsageError("give exactly one of --guest-pgtable ADDR (nested on) and --stage2 (nested off)");
  if (stage2) return 0n;
  const addr = parseU64(table, "guest-pgtable");
  if (addr === 0n || addr % 0x1000n !== 0n)
    throw new UsageError(`--guest-pgtable must be a non-zero 4 KiB-aligned guest physical address, got ${String(table)}`);
  return addr;
}

/** The vIOMMU of `device replace --viommu ID` (0: none); only with --guest-pgtable. @throws UsageError */
export function parseReplaceViommu(v: Record<string, string | boolean | undefined>, guestPgtable: bigint): number {
  if (v["viommu"] === undefined) return 0;
  if (guestPgtable === 0n) throw new UsageError("--viommu goes with --guest-pgtable: the stage 2 alone is on no vIOMMU");
  const id = parseCount(v["viommu"], "viommu", 0xffff_ffff);
  if (id === 0) throw new UsageError("--viommu must be a vIOMMU id (1..4294967295), got 0");
  return id;
}

/** The `device` command, for main.ts's command table. */
export function deviceCommands(ctx: FaultCommandContext): Record<string, FaultCommand> {
  return {
    device: {
      summary: "a VM's physical device: `device register|assign|replace|unassign` (replace: nested translation on/off)",
      usage: USAGE,
      options: {
        ...dirOption,
        vm: { type: "string" },
        device: { type: "string" },
        "max-pasids": { type: "string", default: String(1 << 20) },
        "no-pri": { type: "boolean", default: false },
        "guest-pgtable": { type: "string" },
        stage2: { type: "boolean", default: false },
        viommu: { type: "string" },
        json: { type: "boolean", default: false },
      },
      run: async (v, pos) => {
        const verb = parseVerb(pos);
        const dir = v["dir"] as string;
        const deviceId = requireString(v["device"], "device", "the device id, e.g. 0000:6a:01.0");
        if (verb === "register") {
          const maxPasids = parseCount(v["max-pasids"], "max-pasids", 1 << 20);
          return ctx.withStack(dir, async (c) => {
            const r = await c.iommu.registerDevice(
              iommu.RegisterDeviceRequest.fromPartial({
                deviceId,
                maxPasids,
                priCapable: v["no-pri"] !== true,
                function: iommu.DeviceFunction.DEVICE_FUNCTION_PF,
                iommuGroup: 1,
              }),
            );
            ctx.out(`device ${r.device!.deviceId} registered: max_pasids ${r.device!.maxPasids}, PRI ${r.device!.priCapable ? "yes" : "no"}`);
            return 0;
          });
        }
        const guestPgtable = verb === "replace" ? parseReplaceTarget(v) : 0n;
        const viommuId = verb === "replace" ? parseReplaceViommu(v, guestPgtable) : 0;
        const vm = ctx.findVm(dir, v["vm"] as string | undefined);
        return ctx.withStack(dir, (c) => runVerb(c, verb, vm, deviceId, guestPgtable, v["json"] === true, ctx, viommuId));
      },
    },
  };
}

async function runVerb(
  c: StackClients,
  verb: Exclude<Verb, "register">,
  vm: VmRef,
  deviceId: string,
  guestPgtable: bigint,
  json: boolean,
  ctx: FaultCommandContext,
  viommuId = 0,
): Promise<number> {
  const device = { ref: { $case: "deviceId" as const, value: deviceId } };
  const containerId = vm.containerId;
  switch (verb) {
    case "assign":
      await c.vfio.assignDevice(vfio.AssignDeviceRequest.fromPartial({ containerId, device }));
      ctx.out(`device ${deviceId} assigned to vm ${vm.name} (container ${containerId}): translated through the VM's stage 2`);
      return 0;
    case "unassign": {
      const r = await c.vfio.unassignDevice(vfio.UnassignDeviceRequest.fromPartial({ containerId, device }));
      ctx.out(`device ${deviceId} unassigned from vm ${vm.name}: ${r.unbound} guest bind(s) unbound`);
      return 0;
    }
    case "replace": {
      const r = await c.vfio.replaceDeviceDomain(vfio.ReplaceDeviceDomainRequest.fromPartial({ containerId, device, guestPgtable, viommuId }));
      if (json) ctx.out(JSON.stringify(vfio.ReplaceDeviceDomainResponse.toJSON(r)));
      else {
        const on = viommuId === 0 ? "" : ` on viommu ${viommuId}`;
        const what = r.guestPgtable === 0n ? "the VM's stage 2" : `nested domain${on} over the stage 2, guest page table ${hex(r.guestPgtable)}`;
        ctx.out(
          `device ${deviceId} of vm ${vm.name}: domain ${r.domainId} (${what}); ${r.answeredFaultGroups} fault group(s) of the old attachment answered INVALID`,
        );
      }
      return 0;
    }
  }
}

import { expect } from "vitest";
import { DomainError } from "@ioasid/errors";
import type { StackClients } from "@ioasid/cli";
import { iommu, vdcm } from "@ioasid/proto";

const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);

/**
 * What a refused call must not change, as one comparable string: the core's sets and IOASIDs (of
 * `scope.setId`, or all), KVM's VMs (`scope.vmId`, or all), VDCM's, the IOMMU's (domains, mappings) and
 * VFIO's state, plus whatever `extra` the test adds (read at the same moment). `takenAt` (when each
 * service answered) is left out: it is not state.
 */
export async function stackSnapshot(
  c: StackClients,
  scope: { readonly setId?: number; readonly vmId?: number } = {},
  extra: Record<string, unknown> = {},
): Promise<string> {
  const state = {
    sets: (await c.core.listSets({})).sets,
    ioasids: (await c.core.listIoasids({ setId: scope.setId ?? 0 })).ioasids,
    ...extra,
    kvm: (await c.kvm.queryState({ vmId: scope.vmId ?? 0 })).vms,
    vdcm: await c.vdcm.queryState(P(vdcm.QueryStateRequest, {})),
    iommu: await c.iommu.queryState(P(iommu.QueryStateRequest, {})),
    vfio: (await c.vfio.queryState({ containerId: 0 })).containers,
  };
  return JSON.stringify(state, (k, v: unknown) => (k === "takenAt" ? undefined : typeof v === "bigint" ? String(v) : v));
}

/** The DomainError `call` is refused with; fails the test (with `what`) when it is accepted. */
export async function refusal(call: Promise<unknown>, what: string): Promise<DomainError> {
  try {
    await call;
  } catch (err) {
    expect(err, what).toBeInstanceOf(DomainError);
    return err as DomainError;
  }
  throw new Error(`${what} was accepted`);
}

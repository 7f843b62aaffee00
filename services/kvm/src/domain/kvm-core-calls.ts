// KVM's calls to ioasid-core, over the roles' one CorePort. Failures are the core's DomainErrors.
import { isDomainError } from "@ioasid/errors";
import { Priority, type Holder } from "@ioasid/ioasid";
import { ensureRegistration, heldReferences, type CorePort } from "@ioasid/role-kit";
import { KVM_SUBSCRIBER, type HolderReference, type RegistrationStatus } from "./holder-reference.js";
import { KVM_EVENT_TYPES } from "./kvm-event.js";

function holderOf(ref: HolderReference): Holder {
  return { role: KVM_SUBSCRIBER, instance: ref.instance, purpose: ref.purpose };
}

/** Registers `kvm/<instance>` by MM token at CPU priority for BIND, UNBIND and FREE (idempotent). */
export async function registerVm(core: CorePort, instance: string, mmToken: bigint): Promise<RegistrationStatus> {
  const r = await ensureRegistration(core, {
    subscriber: { name: KVM_SUBSCRIBER, instance },
    priority: Priority.CPU,
    scope: { kind: "mm", token: mmToken },
    events: KVM_EVENT_TYPES,
  });
  return { registrationId: r.id, instance: r.subscriber.instance, active: r.active, setId: r.setId };
}

/** Every registration of subscriber "kvm". */
export async function kvmRegistrations(core: CorePort): Promise<RegistrationStatus[]> {
  return (await core.listRegistrations())
    .filter((r) => r.subscriber.name === KVM_SUBSCRIBER)
    .map((r) => ({ registrationId: r.id, instance: r.subscriber.instance, active: r.active, setId: r.setId }));
}

/** ioasid_get() for the holder. @returns the reference count after it */
export async function getReference(core: CorePort, ref: HolderReference): Promise<number> {
  return (await core.get(ref.setId, ref.ioasid, holderOf(ref), ref.generation)).refcount;
}

/** ioasid_put() for the holder. */
export async function putReference(core: CorePort, ref: HolderReference): Promise<void> {
  await core.put(ref.setId, ref.ioasid, holderOf(ref), ref.generation);
}

/** Does the holder hold a reference on the IOASID at that generation? */
export async function holdsReference(core: CorePort, ref: HolderReference): Promise<boolean> {
  const info = await core.describe(ref.ioasid);
  return (
    info !== undefined &&
    info.generation === ref.generation &&
    info.holders.some((h) => h.holder.role === KVM_SUBSCRIBER && h.holder.instance === ref.instance && h.holder.purpose === ref.purpose)
  );
}

/** References `kvm/<instance>/*` holds on IOASIDs of a set, one entry per reference; none once the set is gone. */
export async function vmReferences(core: CorePort, setId: number, instance: string): Promise<HolderReference[]> {
  let held;
  try {
    held = await heldReferences(core, setId, { role: KVM_SUBSCRIBER, instance });
  } catch (err) {
    if (isDomainError(err, "SET_UNKNOWN")) return [];
    throw err;
  }
  const refs: HolderReference[] = [];
  for (const h of held) {
    for (let i = 0; i < h.count; i++) refs.push({ setId, ioasid: h.ioasid, generation: h.generation, instance, purpose: h.purpose });
  }
  return refs;
}

/** References of any set held by a `kvm/<instance>` whose instance is not in `live`. */
export async function orphanReferences(core: CorePort, live: ReadonlySet<string>): Promise<HolderReference[]> {
  const refs: HolderReference[] = [];
  for (const set of await core.listSets()) {
    let ioasids;
    try {
      ioasids = await core.listIoasids(set.id);
    } catch (err) {
      if (isDomainError(err, "SET_UNKNOWN")) continue;
      throw err;
    }
    for (const info of ioasids) {
      for (const h of info.holders) {
        if (h.holder.role !== KVM_SUBSCRIBER || live.has(h.holder.instance)) continue;
        for (let i = 0; i < h.count; i++)
          refs.push({ setId: set.id, ioasid: info.ioasid, generation: info.generation, instance: h.holder.instance, purpose: h.holder.purpose });
      }
    }
  }
  return refs;
}

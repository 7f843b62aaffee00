import { isDomainError } from "@ioasid/errors";
import { EventType, Priority } from "@ioasid/ioasid";
import { ensureRegistration, type CorePort } from "@ioasid/role-kit";

/** Who VDCM's notifier is at the core: subscriber `vdcm`/`<instance>`. */
export interface VdcmSubscriber {
  readonly name: string;
  readonly instance: string;
}

/**
 * Registers (or finds, after a restart) VDCM's notifier on the set: DEVICE priority, set scope,
 * FREE events (ioasid.rst: "KVM and VDCM shall use notification priority IOASID_PRIO_CPU and
 * IOASID_PRIO_DEVICE respectively").
 * @returns the registration id
 * @throws DomainError FAILED_PRECONDITION `SET_NOT_EMPTY`, INVALID_ARGUMENT `SET_UNKNOWN`
 */
export async function registerOnSet(core: CorePort, subscriber: VdcmSubscriber, setId: number): Promise<number> {
  const r = await ensureRegistration(core, { subscriber, priority: Priority.DEVICE, scope: { kind: "set", setId }, events: [EventType.FREE] });
  return r.id;
}

/** Withdraws a registration; one that is already gone (its set was destroyed) is not an error. */
export async function unregisterNotifier(core: CorePort, registrationId: number): Promise<void> {
  try {
    await core.unregister(registrationId);
  } catch (err) {
    // Set-scope registrations go away with their set (README "Design notes").
    if (!isDomainError(err, "REGISTRATION_NOT_FOUND")) throw err;
  }
}

/** VDCM's own registrations (this instance): id and set. */
export async function ownRegistrations(
  core: CorePort,
  subscriber: VdcmSubscriber,
): Promise<Array<{ readonly registrationId: number; readonly setId: number }>> {
  return (await core.listRegistrations())
    .filter((r) => r.subscriber.name === subscriber.name && r.subscriber.instance === subscriber.instance)
    .map((r) => ({ registrationId: r.id, setId: r.setId }));
}

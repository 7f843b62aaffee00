import { isDomainError } from "@ioasid/errors";
import { core, events } from "@ioasid/proto";
import { ensureRegistration, type CoreClient } from "@ioasid/role-kit";
import type { HeldReference, IoasidPort, NotifierPort } from "./ports.js";

/** The {@link IoasidPort} over a CoreService client (each call with the client's deadline). */
export function coreIoasidPort(client: CoreClient): IoasidPort {
  return {
    findBySpid: (setId, spid, holder) => client.findBySpid(core.FindBySpidRequest.fromPartial({ setId, spid, holder })),
    find: async (setId, ioasid, generation) => ({ generation: (await client.find({ setId, ioasid, generation })).info!.generation }),
    get: (setId, ioasid, holder, generation) => client.get(core.GetRequest.fromPartial({ setId, ioasid, holder, generation })),
    put: (setId, ioasid, holder, generation) => client.put(core.PutRequest.fromPartial({ setId, ioasid, holder, generation })),
    listHeld: async (setId, role, instance) => {
      const { ioasids } = await client.listIoasids({ setId });
      const out: HeldReference[] = [];
      for (const info of ioasids) {
        for (const h of info.holders) {
          if (h.holder?.role === role && h.holder.instance === instance) {
            out.push({ setId: info.setId, ioasid: info.ioasid, generation: info.generation, purpose: h.holder.purpose, count: h.count });
          }
        }
      }
      return out;
    },
  };
}

/**
 * The {@link NotifierPort} over a CoreService client: VDCM's notifier on a set is subscriber
 * `vdcm`/`instance` at DEVICE priority for FREE events (ioasid.rst: "KVM and VDCM shall use
 * notification priority IOASID_PRIO_CPU and IOASID_PRIO_DEVICE respectively").
 */
export function coreNotifierPort(client: CoreClient, subscriber: { readonly name: string; readonly instance: string }): NotifierPort {
  return {
    register: async (setId) =>
      (
        await ensureRegistration(client, {
          subscriber,
          priority: events.Priority.PRIORITY_DEVICE,
          scope: { $case: "setId", value: setId },
          events: [events.EventType.EVENT_TYPE_FREE],
        })
      ).registrationId,
    unregister: async (registrationId) => {
      try {
        await client.unregister({ registrationId });
      } catch (err) {
        // Set-scope registrations go away with their set (README "Design notes").
        if (!isDomainError(err, "REGISTRATION_NOT_FOUND")) throw err;
      }
    },
    listOwn: async () => {
      const { registrations } = await client.listRegistrations({});
      return registrations
        .filter((r) => r.subscriber?.name === subscriber.name && r.subscriber.instance === subscriber.instance)
        .map((r) => ({ registrationId: r.registrationId, setId: r.activeSetId }));
    },
  };
}

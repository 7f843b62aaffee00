import { startSubscriber, DEFAULT_PREFIX, type EventHandler } from "@ioasid/bus";
import type { NatsConnection } from "@nats-io/transport-node";
import { KVM_SUBSCRIBER } from "../domain/holder-reference.js";
import type { NotifierPort } from "../domain/kvm-event.js";
import { toKvmEvent } from "./convert.js";

/**
 * One NATS subscription per VM instance (subscriber `kvm/<instance>`) through the bus SDK.
 * @param observe wraps each handler (the role's delivery metrics, `RoleRuntime.observeHandler`)
 */
export function createNotifierPort(nc: NatsConnection, prefix: string = DEFAULT_PREFIX, observe: (h: EventHandler) => EventHandler = (h) => h): NotifierPort {
  return {
    subscribe: async (instance, handler) => {
      const sub = await startSubscriber({ nc, name: KVM_SUBSCRIBER, instance, prefix, handler: observe((e, ctx) => handler(toKvmEvent(e), ctx.attempt)) });
      return { stop: () => sub.stop() };
    },
  };
}

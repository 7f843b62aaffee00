#!/usr/bin/env node
/**
 * Deliberately broken KVMs for the conformance kit's mutation test (issue 13, DESIGN §12): our KVM,
 * composed as services/kvm/src/main.ts composes it, with one wrapper around one of its parts,
 * chosen by IOASID_MUTANT. Test-only: never a mode of the real service. Each mutant must fail the
 * clause it breaks (test/conform/kvm-conform.test.ts says which).
 */
import { startSubscriber } from "@ioasid/bus";
import { configOrExit, createClient, formatAddress } from "@ioasid/grpc-kit";
import { core as coreProto, kvm } from "@ioasid/proto";
import { buildKvmRole, KVM_SUBSCRIBER, kvmConfigSchema, kvmStateCodec, toKvmEvent, type KvmEventHandler, type NotifierPort } from "@ioasid/kvm";
import { createCoreClient, runRole, type RoleRuntime } from "@ioasid/role-kit";

/** The broken variants. */
export const KVM_MUTANTS = [
  /** Acknowledges FREE (with its release) at once and clears the VMCS entry 3 s later. */
  "ack-before-clear",
  /** Handles FREE but acknowledges it without releasing its reference. */
  "forgets-release",
  /** Remembers no acknowledgement: a re-delivered BIND is handled again (a second reference). */
  "reapplies-redelivery",
  /** A FREE also clears the same guest PASID in every other VM's table. */
  "touches-other-vm",
  /** An UNBIND for an IOASID it has no entry for fails (acknowledged FAILED). */
  "unbind-after-free-fails",
  /** Records no vmcs_update history. */
  "drops-history",
  /** Comes back from a restart with no VMs: ignores what it kept. */
  "forgets-state",
] as const;
export type KvmMutant = (typeof KVM_MUTANTS)[number];

const config = configOrExit(kvmConfigSchema, { service: "kvm" });
const core = createCoreClient(formatAddress(config.coreAddress.host, config.coreAddress.port));
/** A client of this very KVM (touches-other-vm looks at the other VMs' tables through it). */
const self = createClient(kvm.KvmServiceService, formatAddress(config.address.host, config.address.port), { deadlineMs: 5000 });

const mutant = process.env["IOASID_MUTANT"] as KvmMutant | undefined;
if (mutant === undefined || !KVM_MUTANTS.includes(mutant)) {
  process.stderr.write(`IOASID_MUTANT must be one of ${KVM_MUTANTS.join(", ")}\n`);
  process.exit(2);
}

/** Per VM instance, its real handler (touches-other-vm reaches the other VMs through them). */
const handlers = new Map<string, KvmEventHandler>();
/** Deliveries handled, by instance and sequence (reapplies-redelivery). */
const seen = new Set<string>();

function mutateHandler(instance: string, real: KvmEventHandler): KvmEventHandler {
  switch (mutant) {
    case "ack-before-clear":
      return async (e, attempt) => {
        if (e.type !== "FREE") return real(e, attempt);
        setTimeout(() => void real(e, attempt).catch(() => undefined), 3000);
        return { release: ["vmcs"] };
      };
    case "forgets-release":
      return async (e, attempt) => {
        const r = await real(e, attempt);
        return e.type === "FREE" ? {} : r;
      };
    case "touches-other-vm":
      // Clears "the guest PASID" in every VM it knows, not only in the VM whose set the FREE is for.
      return async (e, attempt) => {
        const r = await real(e, attempt);
        if (e.type === "FREE" && e.spid !== 0) {
          const all = await self.queryState({ vmId: 0 });
          for (const vm of all.vms) {
            const t = vm.translations.find((x) => x.gpasid === e.spid);
            const other = handlers.get(`vm-${vm.vmId}`);
            if (t === undefined || other === undefined || other === handlers.get(instance)) continue;
            await other({ seq: e.seq, type: "FREE", ioasid: t.hpasid, generation: t.generation, spid: t.gpasid, setId: vm.setId }, attempt).catch(
              () => undefined,
            );
          }
        }
        return r;
      };
    case "reapplies-redelivery":
      // Takes its reference again for a BIND it has seen (no memory of what it acknowledged).
      return async (e, attempt) => {
        const r = await real(e, attempt);
        const key = `${instance}:${e.seq}`;
        if (e.type === "BIND" && seen.has(key)) {
          await core.get(
            coreProto.GetRequest.fromPartial({
              setId: e.setId,
              ioasid: e.ioasid,
              generation: e.generation,
              holder: { role: KVM_SUBSCRIBER, instance, purpose: "vmcs" },
            }),
          );
        }
        seen.add(key);
        return r;
      };
    case "unbind-after-free-fails":
      return async (e, attempt) => {
        const r = await real(e, attempt);
        if (e.type === "UNBIND" && (r.release ?? []).length === 0) throw new Error("UNBIND of an IOASID with no entry");
        return r;
      };
    default:
      return real;
  }
}

function mutatedNotifier(rt: RoleRuntime<unknown>): NotifierPort {
  return {
    subscribe: async (instance, handler) => {
      const h = mutateHandler(instance, handler);
      handlers.set(instance, handler);
      const sub = await startSubscriber({
        nc: rt.nc,
        name: KVM_SUBSCRIBER,
        instance,
        prefix: rt.prefix,
        handler: (e, ctx) => h(toKvmEvent(e), ctx.attempt),
        ...(mutant === "reapplies-redelivery" ? { dedupeWindow: 0 } : {}),
      });
      return {
        stop: async () => {
          handlers.delete(instance);
          await sub.stop();
        },
      };
    },
  };
}

await runRole({
  role: KVM_SUBSCRIBER,
  instance: "kvm0",
  config,
  codec: kvmStateCodec,
  connectionName: "kvm",
  build: (rt) => {
    const runtime: typeof rt = {
      ...rt,
      saved: mutant === "forgets-state" ? new Map() : rt.saved,
      history:
        mutant === "drops-history"
          ? (sink) => {
              const gated = rt.history(sink);
              return { record: (action, fields, ts) => (action.$case === "vmcsUpdate" ? undefined : gated.record(action, fields, ts)) };
            }
          : rt.history,
    };
    return buildKvmRole(runtime, {
      core,
      host: config.address.host,
      port: config.address.port,
      reapStale: config.reapStale,
      notifier: mutatedNotifier(runtime as RoleRuntime<unknown>),
    });
  },
});

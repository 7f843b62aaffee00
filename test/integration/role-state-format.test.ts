import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { DEFAULT_PREFIX, roleStateStreamName, roleStateSubject } from "@ioasid/bus";
import { natsEnv, startService } from "@ioasid/testkit";
import { serviceEntry, startCore, type CoreFixture } from "../support/core-fixture.js";

// Issue 12: a role's kept state is typed (ioasid.<role>.v1.<Role>StateEntry, marked with its
// format). A store written by the previous format — JSON {key, value} on the role's subjects — is
// refused when the real role process starts, with a message that says what to do, and the process
// exits non-zero: it never misreads it. Doing what the message says lets the role start.

let core: CoreFixture;
let nc: NatsConnection;
beforeAll(async () => {
  core = await startCore();
  nc = await connect({ servers: core.nats.url });
}, 60_000);
afterAll(async () => {
  await nc?.close();
  await core?.stop();
});

/** Writes `value` the way the previous RoleState did (one subject per key, JSON, no marker). */
async function writeOldJson(role: string, instance: string, key: string, value: unknown): Promise<void> {
  const jsm = await jetstreamManager(nc);
  const stream = roleStateStreamName(DEFAULT_PREFIX);
  await jsm.streams.info(stream).catch(() => jsm.streams.add({ name: stream, subjects: [`${DEFAULT_PREFIX}.rolestate.>`], max_msgs_per_subject: 1 }));
  await jetstream(nc).publish(roleStateSubject(DEFAULT_PREFIX, role, instance, key), JSON.stringify({ key, value }));
}

const roles = [
  {
    role: "vdcm",
    instance: "vdcm0",
    format: "ioasid.vdcm.v1.VdcmStateEntry",
    key: "dev/dsa0",
    value: { deviceId: "dsa0", maxPasidEntries: 16, wqs: [{ wqId: 0, mode: "DEDICATED", size: 8 }] },
    env: { VDCM_GRPC_ADDRESS: "127.0.0.1:0", IOMMU_ADDRESS: "127.0.0.1:1" },
  },
  {
    role: "kvm",
    instance: "kvm0",
    format: "ioasid.kvm.v1.KvmStateEntry",
    key: "vm/1",
    value: { vmId: 1, instance: "vm-1", mmToken: "112", vmName: "g", vcpuCount: 1, createdAt: 0, registrationId: 1, setId: 0 },
    env: { KVM_GRPC_ADDRESS: "127.0.0.1:0" },
  },
  {
    role: "iommu",
    instance: "dmar0",
    format: "ioasid.iommu.v1.IommuStateEntry",
    key: "ids",
    value: { nextDomainId: 3, nextHandleId: "5" },
    env: { IOMMU_GRPC_ADDRESS: "127.0.0.1:0" },
  },
  {
    role: "vfio",
    instance: "vfio-1",
    format: "ioasid.vfio.v1.VfioStateEntry",
    key: "next",
    value: 4,
    env: { VFIO_GRPC_ADDRESS: "127.0.0.1:0", IOMMU_ADDRESS: "127.0.0.1:1", VDCM_ADDRESS: "127.0.0.1:1" },
  },
] as const;

describe("a role whose kept state predates the typed format", () => {
  for (const r of roles) {
    it(`${r.role}: refuses to start on it, exits non-zero, and says how to start from an empty state`, async () => {
      await writeOldJson(r.role, r.instance, r.key, r.value);
      const subjects = `${DEFAULT_PREFIX}.rolestate.${r.role}.${r.instance}.>`;
      const started = startService({
        name: r.role,
        entry: serviceEntry(r.role),
        env: { ...(await natsEnv(core.nats, r.role)), IOASID_CORE_ADDRESS: core.proc.address, ...r.env },
        readyTimeoutMs: 20_000,
      });
      const err = await started.then(
        async (proc) => {
          await proc.stop();
          return undefined;
        },
        (e: unknown) => e as Error,
      );
      expect(err, `${r.role} started on a JSON store`).toBeInstanceOf(Error);
      expect(err!.message).toContain("exited (code 1");
      expect(err!.message).toContain(`predates the typed state format (JSON written by an earlier version, not ${r.format})`);
      expect(err!.message).toContain(`Start ${r.role} from an empty state`);
      expect(err!.message).toContain(`nats stream purge ${roleStateStreamName(DEFAULT_PREFIX)} --subject '${subjects}'`);

      // Doing what it says: the role's subjects purged, it starts (from an empty state) and listens.
      await (await jetstreamManager(nc)).streams.purge(roleStateStreamName(DEFAULT_PREFIX), { filter: subjects });
      const proc = await startService({
        name: r.role,
        entry: serviceEntry(r.role),
        env: { ...(await natsEnv(core.nats, r.role)), IOASID_CORE_ADDRESS: core.proc.address, ...r.env },
        readyTimeoutMs: 20_000,
      });
      expect(proc.logs()).not.toContain("kept state");
      // A SIGTERM this early is held until the role can stop gracefully (holdSignals): exit 0.
      expect(await proc.stop()).toBe(0);
    }, 60_000);
  }
});

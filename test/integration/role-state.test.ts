import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connect, headers, type NatsConnection } from "@nats-io/transport-node";
import { jetstream } from "@nats-io/jetstream";
import { DEFAULT_PREFIX, protoStateCodec, ROLE_STATE_UNREADABLE, RoleState, roleStateSubject, type StateCodec } from "@ioasid/bus";
import { DomainError } from "@ioasid/errors";
import { kvmState, vdcmState } from "@ioasid/proto";
import { startNats, type NatsServer } from "@ioasid/testkit";

// A role's state in JetStream: what was written last per key comes back after a restart (a new
// connection, a new RoleState), deletes stay deleted, and instances do not see each other's keys.
// Entries are proto messages marked with their format: anything else is refused, never misread.

type Entry = vdcmState.VdcmStateEntry;
const codec: StateCodec<Entry> = protoStateCodec(
  "ioasid.vdcm.v1.VdcmStateEntry",
  vdcmState.VdcmStateEntry,
  (e: Entry) => e,
  (m) => m,
);
const pasidEntry = (hpasid: number): Entry => ({
  entry: { $case: "pasidEntry", value: vdcmState.KeptDevicePasidEntry.fromPartial({ deviceId: "0000:6a:01.0", hpasid }) },
});
const device = (maxPasidEntries: number): Entry => ({
  entry: { $case: "device", value: vdcmState.KeptDevice.fromPartial({ deviceId: "0000:6a:01.0", maxPasidEntries }) },
});
const registration = (registrationId: number): Entry => ({ entry: { $case: "registration", value: { setId: 1, registrationId } } });

let nats: NatsServer;
let nc: NatsConnection;
beforeAll(async () => {
  nats = await startNats();
  nc = await connect({ servers: nats.url });
});
afterAll(async () => {
  await nc?.close();
  await nats?.stop();
});

describe("RoleState", () => {
  it("keeps the last value of every key across a reconnect, forgets deleted keys, and separates instances", async () => {
    const a = await RoleState.open(nc, { role: "vdcm", instance: "vdcm0", codec });
    const b = await RoleState.open(nc, { role: "vdcm", instance: "vdcm:1", codec });
    expect(await a.load()).toEqual(new Map());
    await a.write([
      { key: "dev/0000:6a:01.0", value: device(4) },
      { key: "entry/0000:6a:01.0/1", value: pasidEntry(201) },
      { key: "entry/0000:6a:01.0/2", value: pasidEntry(202) },
    ]);
    await a.write([
      { key: "entry/0000:6a:01.0/1", value: pasidEntry(301) },
      { key: "entry/0000:6a:01.0/2", value: undefined },
    ]);
    await b.write([{ key: "dev/x", value: registration(1) }]);

    const nc2 = await connect({ servers: nats.url });
    try {
      const again = await RoleState.open(nc2, { role: "vdcm", instance: "vdcm0", codec });
      expect(await again.load()).toEqual(
        new Map<string, Entry>([
          ["dev/0000:6a:01.0", device(4)],
          ["entry/0000:6a:01.0/1", pasidEntry(301)],
        ]),
      );
      expect(await (await RoleState.open(nc2, { role: "vdcm", instance: "vdcm:1", codec })).load()).toEqual(new Map([["dev/x", registration(1)]]));
      await again.clear();
      expect(await again.load()).toEqual(new Map());
      expect((await b.load()).size).toBe(1);
    } finally {
      await nc2.close();
    }
  });

  it("loads thousands of keys", async () => {
    const s = await RoleState.open(nc, { role: "kvm", instance: "big", codec });
    const changes = Array.from({ length: 3000 }, (_, i) => ({ key: `vmcs/1/${i}`, value: pasidEntry(i + 1) }));
    await s.write(changes);
    const loaded = await s.load();
    expect(loaded.size).toBe(3000);
    expect(loaded.get("vmcs/1/2999")).toEqual(pasidEntry(3000));
  });

  it("refuses at load a state written as JSON before the typed format, saying how to start from an empty state", async () => {
    const s = await RoleState.open(nc, { role: "vdcm", instance: "old", codec });
    await s.write([{ key: "dev/d0", value: device(4) }]);
    // What the previous RoleState wrote: JSON {key, value}, no format marker.
    await jetstream(nc).publish(roleStateSubject(DEFAULT_PREFIX, "vdcm", "old", "entry/d0/1"), JSON.stringify({ key: "entry/d0/1", value: { hpasid: 201 } }));
    const err = await s.load().then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(DomainError);
    expect((err as DomainError).reason).toBe(ROLE_STATE_UNREADABLE);
    expect((err as DomainError).message).toContain("1 entry of the kept state of vdcm/old");
    expect((err as DomainError).message).toContain("predates the typed state format (JSON written by an earlier version, not ioasid.vdcm.v1.VdcmStateEntry)");
    expect((err as DomainError).message).toContain("Start vdcm from an empty state");
    expect((err as DomainError).message).toContain(`nats stream purge IOASID_V1_ROLESTATE --subject '${DEFAULT_PREFIX}.rolestate.vdcm.old.>'`);
    // Doing what it says: the role then starts from nothing.
    await s.clear();
    expect(await s.load()).toEqual(new Map());
  });

  it("refuses an entry in another format, or one that does not decode, rather than misread it", async () => {
    const other = await RoleState.open(nc, {
      role: "vdcm",
      instance: "mixed",
      codec: protoStateCodec(
        "ioasid.kvm.v1.KvmStateEntry",
        kvmState.KvmStateEntry,
        (e: kvmState.KvmStateEntry) => e,
        (m) => m,
      ),
    });
    await other.write([{ key: "vm/1", value: { entry: { $case: "vm", value: kvmState.KeptVm.fromPartial({ vmId: 1 }) } } }]);
    const s = await RoleState.open(nc, { role: "vdcm", instance: "mixed", codec });
    await expect(s.load()).rejects.toThrow(
      "is not in ioasid.vdcm.v1.VdcmStateEntry (ioasid.v1.rolestate.vdcm.mixed.vm~2f1: format ioasid.kvm.v1.KvmStateEntry)",
    );

    const strict = await RoleState.open(nc, {
      role: "vdcm",
      instance: "broken",
      codec: protoStateCodec(
        "ioasid.vdcm.v1.VdcmStateEntry",
        vdcmState.VdcmStateEntry,
        (e: Entry) => e,
        (m) => {
          if (m.entry === undefined) throw new Error("VdcmStateEntry.entry is missing");
          return m;
        },
      ),
    });
    await strict.write([{ key: "reg/1", value: registration(3) }]);
    // A writer that marked bytes of another message as this format.
    const h = headers();
    h.set("Ioasid-Format", "ioasid.vdcm.v1.VdcmStateEntry");
    h.set("Ioasid-State-Key", "reg/2");
    await jetstream(nc).publish(roleStateSubject(DEFAULT_PREFIX, "vdcm", "broken", "reg/2"), new Uint8Array([0x28, 0x01]), { headers: h });
    await expect(strict.load()).rejects.toThrow("does not decode as ioasid.vdcm.v1.VdcmStateEntry");
  });
});

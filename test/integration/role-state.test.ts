import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { RoleState } from "@ioasid/bus";
import { startNats, type NatsServer } from "@ioasid/testkit";

// A role's state in JetStream: what was written last per key comes back after a restart (a new
// connection, a new RoleState), deletes stay deleted, and instances do not see each other's keys.

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
    const a = await RoleState.open(nc, { role: "vdcm", instance: "vdcm0" });
    const b = await RoleState.open(nc, { role: "vdcm", instance: "vdcm:1" });
    expect(await a.load()).toEqual(new Map());
    await a.write([
      { key: "dev/0000:6a:01.0", value: { wqs: 4 } },
      { key: "entry/0000:6a:01.0/1", value: { hpasid: 201 } },
      { key: "entry/0000:6a:01.0/2", value: { hpasid: 202 } },
    ]);
    await a.write([
      { key: "entry/0000:6a:01.0/1", value: { hpasid: 301 } },
      { key: "entry/0000:6a:01.0/2", value: undefined },
    ]);
    await b.write([{ key: "dev/x", value: 1 }]);

    const nc2 = await connect({ servers: nats.url });
    try {
      const again = await RoleState.open(nc2, { role: "vdcm", instance: "vdcm0" });
      expect(await again.load()).toEqual(
        new Map<string, unknown>([
          ["dev/0000:6a:01.0", { wqs: 4 }],
          ["entry/0000:6a:01.0/1", { hpasid: 301 }],
        ]),
      );
      expect(await (await RoleState.open(nc2, { role: "vdcm", instance: "vdcm:1" })).load()).toEqual(new Map([["dev/x", 1]]));
      await again.clear();
      expect(await again.load()).toEqual(new Map());
      expect((await b.load()).size).toBe(1);
    } finally {
      await nc2.close();
    }
  });

  it("loads thousands of keys", async () => {
    const s = await RoleState.open(nc, { role: "kvm", instance: "big" });
    const changes = Array.from({ length: 3000 }, (_, i) => ({ key: `vmcs/1/${i}`, value: { hpasid: i } }));
    await s.write(changes);
    const loaded = await s.load();
    expect(loaded.size).toBe(3000);
    expect(loaded.get("vmcs/1/2999")).toEqual({ hpasid: 2999 });
  });
});

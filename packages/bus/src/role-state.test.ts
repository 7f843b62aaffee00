import { describe, expect, it } from "vitest";
import { vdcmState } from "@ioasid/proto";
import { isTransientJetStreamError } from "./jetstream-retry.js";
import {
  ensureRoleStateStreamWith,
  failStopOnWriteError,
  MemoryRoleState,
  protoStateCodec,
  roleStateStreamName,
  requireField,
  type RoleStatePort,
  type StateCodec,
} from "./role-state.js";

describe("failStopOnWriteError", () => {
  it("passes writes through, and on a failed write calls the fatal handler and never lets the caller go on", async () => {
    let fail = false;
    const written: string[] = [];
    const store: RoleStatePort = {
      write: async (changes) => {
        if (fail) throw new Error("timeout");
        written.push(...changes.map((c) => c.key));
      },
    };
    const fatal: unknown[] = [];
    const kept = failStopOnWriteError(store, (err) => fatal.push(err));
    await kept.write([{ key: "a", value: 1 }]);
    expect(written).toEqual(["a"]);
    fail = true;
    let settled = false;
    void kept.write([{ key: "b", value: 2 }]).finally(() => (settled = true));
    await new Promise((r) => setTimeout(r, 20));
    expect(fatal).toHaveLength(1);
    expect(settled).toBe(false);
  });

  it("hands the error to the caller instead while the role is already stopping", async () => {
    const store: RoleStatePort = { write: async () => Promise.reject(new Error("closed")) };
    const fatal: unknown[] = [];
    const kept = failStopOnWriteError(store, (err) => fatal.push(err), { stopping: () => true });
    await expect(kept.write([{ key: "a", value: 1 }])).rejects.toThrow("closed");
    expect(fatal).toEqual([]);
  });
});

describe("ensureRoleStateStreamWith", () => {
  // What a three-server cluster with two servers down answered a role at its start (CI, issue 15):
  // no leader for the stream, so info fails; the meta layer refuses the add as "already in use".
  const noQuorum = (firstInfo: Error) => {
    const calls: string[] = [];
    let infos = 0;
    return {
      calls,
      jsm: {
        streams: {
          info: async (name: string) => {
            calls.push(`info ${name}`);
            throw infos++ === 0 ? firstInfo : new Error("stream not found");
          },
          add: async (config: { name?: string }) => {
            calls.push(`add ${config.name}`);
            throw new Error("JetStreamApiError: stream name already in use with a different configuration");
          },
        },
      },
    };
  };

  it("fails transiently (the role's start waits) when the stream exists but JetStream cannot answer for it", async () => {
    const { jsm, calls } = noQuorum(new Error("stream not found"));
    const err = await ensureRoleStateStreamWith(jsm, "t").then(
      () => undefined,
      (e: unknown) => e,
    );
    const name = roleStateStreamName("t");
    expect(calls).toEqual([`info ${name}`, `add ${name}`, `info ${name}`]);
    expect(isTransientJetStreamError(err)).toBe(true);
    expect(String(err)).toContain("exists but JetStream cannot answer for it");
  });

  it("passes a first info's timeout on as it is, without trying to create the stream", async () => {
    const timeout = Object.assign(new Error("TimeoutError: timeout"), { code: "TIMEOUT" });
    const { jsm, calls } = noQuorum(timeout);
    await expect(ensureRoleStateStreamWith(jsm, "t")).rejects.toBe(timeout);
    expect(calls).toHaveLength(1);
  });

  it("still says the core must create it when the stream is missing and this connection may not add it", async () => {
    const calls: string[] = [];
    const jsm = {
      streams: {
        info: async () => {
          calls.push("info");
          throw new Error("stream not found");
        },
        add: async () => {
          calls.push("add");
          throw new Error('Permissions Violation for Publish to "$JS.API.STREAM.CREATE.X"');
        },
      },
    };
    const err = await ensureRoleStateStreamWith(jsm, "t").then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(calls).toEqual(["info", "add", "info"]);
    expect(String(err)).toContain("start the core first");
    expect(isTransientJetStreamError(err)).toBe(false);
  });
});

describe("MemoryRoleState", () => {
  type Reg = { readonly setId: number; readonly registrationId: number };
  const codec = (forget: boolean) =>
    protoStateCodec<Reg, vdcmState.VdcmStateEntry>(
      "ioasid.vdcm.v1.VdcmStateEntry",
      vdcmState.VdcmStateEntry,
      (r) => ({ entry: { $case: "registration", value: { setId: r.setId, registrationId: forget ? 0 : r.registrationId } } }),
      (m) => {
        const e = requireField(m.entry, "VdcmStateEntry.entry");
        if (e.$case !== "registration") throw new Error("not a registration");
        return { setId: e.value.setId, registrationId: e.value.registrationId };
      },
    );

  it("keeps what went through the codec, so a field the codec forgets does not come back", async () => {
    const good = new MemoryRoleState(codec(false));
    const forgetful = new MemoryRoleState(codec(true));
    const saved = good.saved;
    for (const s of [good, forgetful])
      await s.write([
        { key: "reg/4", value: { setId: 4, registrationId: 9 } },
        { key: "reg/5", value: { setId: 5, registrationId: 1 } },
      ]);
    await good.write([{ key: "reg/5", value: undefined }]);
    expect(new Map(saved)).toEqual(new Map([["reg/4", { setId: 4, registrationId: 9 }]]));
    expect(forgetful.saved.get("reg/4")).toEqual({ setId: 4, registrationId: 0 });
  });

  it("refuses an entry that encodes to nothing, and writes none of its batch", async () => {
    const empty: StateCodec<Reg> = { format: "x", encode: () => new Uint8Array(), decode: () => ({ setId: 0, registrationId: 0 }) };
    const store = new MemoryRoleState(empty);
    await expect(store.write([{ key: "reg/1", value: { setId: 1, registrationId: 1 } }])).rejects.toThrow("encodes to nothing");
    expect(store.saved.size).toBe(0);
  });
});

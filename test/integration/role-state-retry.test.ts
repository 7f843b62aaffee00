import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { jetstreamManager, RetentionPolicy, StorageType } from "@nats-io/jetstream";
import { protoStateCodec, RoleState, StateWriteError, type StateCodec } from "@ioasid/bus";
import { vdcm, vdcmState } from "@ioasid/proto";
import { waitFor } from "@ioasid/testkit";
import { startVdcmProcess, startVdcmStack, type VdcmFixture } from "../support/vdcm-fixture.js";

// Issue 15 item 4: a role does not fail-stop on one slow or timed-out write of its state while the
// store is reachable. A write JetStream does not acknowledge is retried with backoff within a bound
// (IOASID_STATE_WRITE_RETRY), keeping each key's order, and the role stops as designed only when
// the store stays unwritable beyond it. JetStream is made slow by stopping nats-server (SIGSTOP)
// and resuming it (SIGCONT): writes wait, their acknowledgements time out, nothing is lost.

type Entry = vdcmState.VdcmStateEntry;
const codec: StateCodec<Entry> = protoStateCodec(
  "ioasid.vdcm.v1.VdcmStateEntry",
  vdcmState.VdcmStateEntry,
  (e: Entry) => e,
  (m) => m,
);
const device = (id: string, maxPasidEntries: number): Entry => ({
  entry: { $case: "device", value: vdcmState.KeptDevice.fromPartial({ deviceId: id, maxPasidEntries }) },
});
const registerRequest = (deviceId: string) => vdcm.RegisterDeviceRequest.fromPartial({ deviceId, wqs: [{ wqId: 0, mode: vdcm.WqMode.WQ_MODE_DEDICATED }] });

let f: VdcmFixture;
/** nats-server is stopped (SIGSTOP) by the test running now: resumed whatever happens. */
let natsStopped = false;
const stopNats = async () => {
  natsStopped = true;
  await f.core.nats.kill("SIGSTOP");
};
const resumeNats = async () => {
  if (!natsStopped) return;
  natsStopped = false;
  await f.core.nats.kill("SIGCONT");
};

beforeAll(async () => {
  // One attempt waits 300 ms for its acknowledgement; a failed write is retried for up to 20 s.
  f = await startVdcmStack({ IOASID_STATE_WRITE_TIMEOUT: "300ms", IOASID_STATE_WRITE_RETRY: "20s" });
}, 60_000);
afterAll(async () => {
  await resumeNats();
  await f?.stop();
});

describe("a role's state write that JetStream does not acknowledge", () => {
  it("is retried: VDCM survives a write that timed out, answers the call, and keeps the device", async () => {
    try {
      await stopNats();
      const call = f.client.registerDevice(registerRequest("slow0"));
      // The first attempt's acknowledgement timed out and the write is being retried (not a sleep:
      // the role says so, and nats-server stays stopped until it did).
      await waitFor(() => f.proc.logs().includes("retrying within the bound"), { timeoutMs: 15_000, message: "VDCM to retry its state write" });
      await resumeNats();
      expect((await call).device?.deviceId).toBe("slow0");
    } finally {
      await resumeNats();
    }
    expect(f.proc.logs()).not.toContain("state store unwritable");
    expect((await f.client.queryState({ deviceIds: ["slow0"] })).devices.map((d) => d.deviceId)).toEqual(["slow0"]);
    const kept = await (await RoleState.open(f.nc, { role: "vdcm", instance: f.instance, codec })).load();
    expect([...kept.values()].some((e) => e.entry?.$case === "device" && e.entry.value.deviceId === "slow0")).toBe(true);
  }, 60_000);

  it("keeps each key's order: a later write of a key made while an earlier one is retried is kept after it, and its value stays", async () => {
    const key = "dev/ordered";
    let retries = 0;
    const settled: number[] = [];
    let later: Promise<void> | undefined;
    const store: RoleState<Entry> = await RoleState.open(f.nc, {
      prefix: "retry-order",
      role: "vdcm",
      instance: "o",
      codec,
      retry: {
        attemptTimeoutMs: 300,
        retryMs: 20_000,
        // Before the earlier write's first retry: NATS back, and a later write of the same key made.
        // Writes are grouped, one group in flight (issue 15): the later write waits for the retried
        // one, so the retry cannot overtake it and store the older value last.
        onRetry: async () => {
          if (retries++ > 0) return;
          await resumeNats();
          later = store.write([{ key, value: device("ordered", 2) }]).then(() => void settled.push(2));
        },
      },
    });
    try {
      await stopNats();
      await store.write([{ key, value: device("ordered", 1) }]).then(() => void settled.push(1));
      await later;
    } finally {
      await resumeNats();
    }
    expect(retries).toBeGreaterThan(0);
    expect(settled).toEqual([1, 2]);
    // The later value (2) is what is kept: the retried write of 1 was stored before it.
    const reader = await RoleState.open(f.nc, { prefix: "retry-order", role: "vdcm", instance: "o", codec });
    expect(await reader.load()).toEqual(new Map([[key, device("ordered", 2)]]));
  }, 60_000);

  it("is not retried when JetStream refused it (the same bytes would be refused again)", async () => {
    const jsm = await jetstreamManager(f.nc);
    await jsm.streams.add({
      name: "RETRY-REFUSED_ROLESTATE",
      subjects: ["retry-refused.rolestate.>"],
      storage: StorageType.Memory,
      retention: RetentionPolicy.Limits,
      max_msg_size: 16,
    });
    let retries = 0;
    const store = await RoleState.open(f.nc, { prefix: "retry-refused", role: "vdcm", instance: "r", codec, retry: { onRetry: () => void retries++ } });
    const write = store.write([{ key: "dev/big", value: device("a-device-id-longer-than-sixteen-bytes", 1) }]);
    const err = await write.then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(StateWriteError);
    expect((err as StateWriteError).attempts).toBe(1);
    expect((err as StateWriteError).message).toMatch(/refused by JetStream/);
    expect(retries).toBe(0);
  });

  it("makes the role fail-stop when the store stays unwritable beyond the bound", async () => {
    // Another VDCM on the same instance whose bound is 1 s.
    await f.proc.stop();
    await startVdcmProcess(f, { IOASID_STATE_WRITE_TIMEOUT: "300ms", IOASID_STATE_WRITE_RETRY: "1s" });
    try {
      await stopNats();
      // Settled as soon as it fails (the process exits under it), whenever this test looks.
      const call = f.client.registerDevice(registerRequest("lost0")).then(
        () => "answered",
        (err: unknown) => err,
      );
      // nats-server stays stopped until the role gave up: its exit is the outcome, not a race.
      const status = await f.proc.exited;
      expect(status.code).toBe(1);
      expect(await call).toMatchObject({ reason: "UNAVAILABLE" });
    } finally {
      await resumeNats();
    }
    const logs = f.proc.logs();
    expect(logs).toContain("retrying within the bound");
    expect(logs).toContain("state store unwritable");
    expect(logs).toMatch(/was not acknowledged after \d+ attempts over \d+ ms \(bound 1000 ms\)/);
  }, 60_000);
});

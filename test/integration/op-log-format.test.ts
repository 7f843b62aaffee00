import { spawn } from "node:child_process";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { connect, headers, type NatsConnection } from "@nats-io/transport-node";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { OpLog, OpLogFormat, OP_LOG_FORMAT_HEADER } from "@ioasid/ioasid-core";
import { startNats, type NatsServer } from "@ioasid/testkit";
import { serviceEntry } from "../support/core-fixture.js";

// The op log is read only in its format (ioasid.oplog.v1, binary protobuf named by the
// Ioasid-Format header). A store written before it (JSON records), or a message that is not an
// op-log message at all, stops the real core at start — exit 1, one log line that says what to
// do, no stack trace — and the store is left as it was: never misread, never written.

const STREAM = "IOASID_CORE_OPS";
const SUBJECT = "ioasid.v1.core.ops";

let nats: NatsServer | undefined;
let nc: NatsConnection | undefined;
beforeEach(async () => {
  nats = await startNats();
  nc = await connect({ servers: nats.url });
});
afterEach(async () => {
  await nc?.close();
  await nats?.stop();
  nc = undefined;
  nats = undefined;
});

/** Runs the built core against the test's nats-server until it exits (it must, by itself). */
function runCore(): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [serviceEntry("ioasid-core")], {
      env: { ...process.env, IOASID_CORE_GRPC_ADDRESS: "127.0.0.1:0", NATS_URL: nats!.url, LOG_LEVEL: "info" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`the core did not exit within 20 s; it logged:\n${stdout}${stderr}`));
    }, 20_000);
    child.on("error", reject);
    child.on("close", (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

/** The stream's message count and last sequence. */
async function streamState(): Promise<{ messages: number; last: number }> {
  const info = await (await jetstreamManager(nc!)).streams.info(STREAM);
  return { messages: info.state.messages, last: info.state.last_seq };
}

/** The refusal line: exit 1, the fatal log line, not listening, no stack trace, store untouched. */
async function expectRefusal(run: { code: number | null; stdout: string; stderr: string }, before: { messages: number; last: number }): Promise<string> {
  const out = run.stdout + run.stderr;
  expect(run.code).toBe(1);
  const line = run.stdout.split("\n").find((l) => l.includes('"level":"fatal"'));
  expect(line, out).toBeDefined();
  expect(JSON.parse(line!)).toMatchObject({ stream: STREAM });
  expect((JSON.parse(line!) as { msg: string }).msg).toMatch(/^cannot start: /);
  expect(out).not.toContain('"msg":"listening"');
  expect(out).not.toMatch(/\n\s+at /); // no stack trace
  expect(await streamState()).toEqual(before); // no seal, no operation: the store is as it was
  return line!;
}

describe("op-log format at start", () => {
  it("refuses a store written in the JSON format before v1, saying how to start from an empty store", async () => {
    // What a core before format v1 left: group commits as JSON arrays of one-letter records, a seal.
    await OpLog.open(nc!); // the stream, as every core creates it
    const js = jetstream(nc!);
    const ts = Date.now();
    await js.publish(
      SUBJECT,
      JSON.stringify([
        { t: "createSet", tt: "MM", tok: "5", q: 4, ts },
        { t: "alloc", s: 1, ts },
      ]),
    );
    await js.publish(SUBJECT, JSON.stringify({ seal: ts }));
    await js.publish(
      SUBJECT,
      JSON.stringify([
        { t: "acks", n: "iommu", in: "dmar0", a: [[3, 1, 1, 201, 1, 1, "bind"]], ts },
        { t: "miss", a: [[4, 2]], ts },
      ]),
    );
    const before = await streamState();

    const line = await expectRefusal(await runCore(), before);
    const msg = (JSON.parse(line) as { msg: string }).msg;
    expect(msg).toContain(
      `the operation log (JetStream stream ${STREAM}) predates format v1 of the op log: its message 1 is the JSON of an earlier ioasid-core`,
    );
    expect(msg).toContain("`ioasidctl down --purge` then `ioasidctl up`");
    expect(msg).toContain("`docker compose down -v`");
    expect(msg).toContain(`\`nats stream rm ${STREAM}\``);
    expect(JSON.parse(line)).toMatchObject({ seq: 1 });
  });

  it("refuses a message that is not an op-log message, after the operations before it", async () => {
    // A log in format v1 (written by the core's own OpLog), then bytes someone else published.
    const log = await OpLog.open(nc!);
    await log.append({ kind: "createSet", token: { type: "MM", value: 5n }, quota: 4, commitTimeMs: Date.now() });
    await log.seal();
    await jetstream(nc!).publish(SUBJECT, Uint8Array.from([0xde, 0xad, 0xbe, 0xef, 0x00, 0x01]));
    const before = await streamState();

    const line = await expectRefusal(await runCore(), before);
    expect((JSON.parse(line) as { msg: string }).msg).toContain(
      `message 3 of the operation log (JetStream stream ${STREAM}) is not an op-log message (no ${OP_LOG_FORMAT_HEADER} header, and not the JSON of an earlier ioasid-core)`,
    );
    expect(JSON.parse(line)).toMatchObject({ seq: 3 });
  });

  it("refuses a message marked as an OpBatch whose payload is not one", async () => {
    await OpLog.open(nc!);
    const h = headers();
    h.set(OP_LOG_FORMAT_HEADER, OpLogFormat.BATCH);
    await jetstream(nc!).publish(SUBJECT, Uint8Array.from([0x0a, 0x7f, 0x01, 0x02]), { headers: h });
    const before = await streamState();

    const line = await expectRefusal(await runCore(), before);
    const msg = (JSON.parse(line) as { msg: string }).msg;
    expect(msg).toContain(
      `message 1 of the operation log (JetStream stream ${STREAM}) is marked ${OpLogFormat.BATCH} but is not a valid one (it does not decode`,
    );
    expect(msg).toContain("ioasidctl down --purge");
  });

  it("starts on a store in format v1 and writes its seal with the format header", async () => {
    // The control: the same store shape in the format the core reads starts and serves.
    const log = await OpLog.open(nc!);
    await log.append({ kind: "createSet", token: { type: "MM", value: 5n }, quota: 4, commitTimeMs: Date.now() });
    const child = spawn(process.execPath, [serviceEntry("ioasid-core")], {
      env: { ...process.env, IOASID_CORE_GRPC_ADDRESS: "127.0.0.1:0", NATS_URL: nats!.url },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let stdout = "";
    child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
    const exited = new Promise<number | null>((resolve) => child.on("close", resolve));
    try {
      const deadline = Date.now() + 20_000;
      while (!stdout.includes('"msg":"state recovered"') && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
      expect(stdout).toContain('"replayed":1');
      const sealed = await (await jetstreamManager(nc!)).streams.getMessage(STREAM, { seq: 2 });
      expect(sealed?.header.get(OP_LOG_FORMAT_HEADER)).toBe(OpLogFormat.SEAL);
    } finally {
      child.kill("SIGTERM");
      expect(await exited).toBe(0);
    }
  });
});

import { execFile } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, describe, expect, it } from "vitest";
import { onFreePorts, PORT_TAKEN } from "../support/free-ports.js";

// `ioasidctl up --standby-core` as a user runs it (issue 18 item 2: "clients — roles, VFIO, the CLI —
// follow it without a restart"): a second core waits behind the serving core's lease; the primary
// is killed with -9; the standby takes over, and the roles and ioasidctl — given both addresses at
// `up`, nothing changed since — run the crashed-guest life cycle through it with a clean verdict;
// the supervisor brings the killed core back as the new standby; `down` stops both.

const cli = fileURLToPath(new URL("../../packages/cli/dist/main.js", import.meta.url));
const dir = mkdtempSync(join(tmpdir(), "ioasidctl-standby-"));

interface Ran {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

function ctl(...args: string[]): Promise<Ran> {
  return new Promise((resolve) => {
    execFile(process.execPath, [cli, ...args, "--dir", dir], { timeout: 120_000 }, (err, stdout, stderr) => {
      resolve({ code: err === null ? 0 : typeof err.code === "number" ? err.code : -1, stdout, stderr });
    });
  });
}

const alive = (pid: number | undefined) => {
  if (pid === undefined) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

interface Status {
  readonly ok: boolean;
  readonly services: readonly { readonly name: string; readonly pid: number | null; readonly health: string; readonly restarts?: number }[];
}

async function status(): Promise<Status> {
  return JSON.parse((await ctl("status", "--json")).stdout) as Status;
}

const health = (s: Status, name: string) => s.services.find((x) => x.name === name)?.health;

/** Polls `status` until `accept` takes it, or fails after `ms` with the last one seen. */
async function statusUntil(accept: (s: Status) => boolean, ms: number, what: string): Promise<Status> {
  const deadline = Date.now() + ms;
  for (;;) {
    const s = await status();
    if (accept(s)) return s;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}; last status:\n${JSON.stringify(s, null, 2)}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

afterAll(async () => {
  if (existsSync(join(dir, "stack.json"))) await ctl("down");
  rmSync(dir, { recursive: true, force: true });
});

describe("ioasidctl up --standby-core", () => {
  it("takes over when the serving core is killed; the roles and ioasidctl follow it; the killed core comes back as the standby", async () => {
    // NATS at base+20: the standby core listens on base+10 and its metrics on base+15.
    const up = await onFreePorts(
      (base) => ctl("up", "--base-port", String(base), "--nats-port", String(base + 20), "--standby-core"),
      (r) => PORT_TAKEN.test(r.stderr),
    );
    expect(up.code, up.stderr).toBe(0);
    expect(up.stdout).toMatch(/ioasid-core-b +pid \d+ +127\.0\.0\.1:\d+ +STANDBY/);
    const state = JSON.parse(readFileSync(join(dir, "stack.json"), "utf8")) as {
      services: Record<string, { pid: number; address: string }>;
      standbyCore: { pid: number; address: string };
    };
    const primaryPid = state.services["ioasid-core"]!.pid;
    const standbyPid = state.standbyCore.pid;

    const before = await status();
    expect(before.ok, JSON.stringify(before)).toBe(true);
    expect(health(before, "ioasid-core")).toBe("SERVING");
    expect(health(before, "ioasid-core-b")).toBe("STANDBY");
    const normal = await ctl("scenario", "run", "normal");
    expect(normal.code, normal.stderr).toBe(0);

    // The primary dies (kill -9). The standby serves within its lease (1 s) and a replay; the
    // supervisor restarts the killed one as the standby. The bound is generous for a busy machine.
    process.kill(primaryPid, "SIGKILL");
    const after = await statusUntil(
      (s) => s.ok && health(s, "ioasid-core-b") === "SERVING" && health(s, "ioasid-core") === "STANDBY",
      30_000,
      "ioasid-core-b to serve and the restarted ioasid-core to wait as the standby",
    );
    const restarted = after.services.find((s) => s.name === "ioasid-core")!;
    expect(restarted.restarts).toBe(1);
    expect(restarted.pid).not.toBe(primaryPid);
    expect(after.services.find((s) => s.name === "ioasid-core-b")!.pid).toBe(standbyPid);

    // Nothing was reconfigured: the roles reach the new core through the addresses `up` gave them,
    // and ioasidctl through the stack's state as it was. The crashed guest is reclaimed, S1–S9 hold.
    const crash = await ctl("scenario", "run", "crash");
    expect(crash.code, `${crash.stdout}\n${crash.stderr}`).toBe(0);
    expect(crash.stdout).toMatch(/ok +S9/);

    // Every process the stack names now (the supervisor's restarts included) is gone after `down`.
    const final = JSON.parse(readFileSync(join(dir, "stack.json"), "utf8")) as {
      services: Record<string, { pid?: number }>;
      standbyCore: { pid?: number };
      supervisor: { pid?: number };
      nats: { pid?: number };
    };
    const pids = [...Object.values(final.services).map((x) => x.pid), final.standbyCore.pid, final.supervisor.pid, final.nats.pid];
    expect(pids.every((pid) => pid !== undefined)).toBe(true);
    const down = await ctl("down");
    expect(down.code, down.stderr).toBe(0);
    expect(down.stdout).toMatch(/ioasid-core-b +pid \d+ stopped/);
    for (const pid of pids) expect(alive(pid), `pid ${pid} stopped`).toBe(false);
  }, 240_000);
});

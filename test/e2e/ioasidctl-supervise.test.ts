import { execFile } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterEach, describe, expect, it } from "vitest";
import { readState, stackDown, stackUp, type StackState } from "@ioasid/cli";

// The embedded stack supervises its services (DESIGN §13, issue 15 item 5), against real processes:
// a service killed with -9 is restarted (new PID, serving again), `status` and the stack's log say
// so, and `down` stops the restarted one too; a service that keeps failing is given up; one whose
// configuration is wrong (exit 2) is not restarted, and `up` says why instead of waiting.

const cli = fileURLToPath(new URL("../../packages/cli/dist/main.js", import.meta.url));

interface Ran {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

/** Runs ioasidctl to its end, whatever its exit status. */
function ctl(dir: string, args: readonly string[], env: NodeJS.ProcessEnv = process.env): Promise<Ran> {
  return new Promise((resolve) => {
    execFile(process.execPath, [cli, ...args, "--dir", dir], { timeout: 60_000, env }, (err, stdout, stderr) => {
      resolve({ code: err === null ? 0 : typeof err.code === "number" ? err.code : -1, stdout, stderr });
    });
  });
}

function alive(pid: number | undefined): boolean {
  if (pid === undefined) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Resolves with `probe`'s value once `accept` takes it, or fails after `ms` saying what did not happen. */
async function until<T>(probe: () => Promise<T> | T, accept: (v: T) => boolean, ms: number, what: string): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await probe();
    if (accept(v)) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}; last seen:\n${typeof v === "string" ? v : JSON.stringify(v)}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

/** Every PID a state names (services, supervisor, nats-server). */
function pidsOf(state: StackState): number[] {
  return [...Object.values(state.services).map((s) => s.pid), state.supervisor?.pid, state.nats.pid].filter((p): p is number => p !== undefined);
}

/**
 * Runs `start` on random ports below Linux's ephemeral range (32768–60999, where the services of
 * tests running beside this one listen), again on others when one is taken (at most 3 times).
 */
async function onFreePorts<T>(start: (base: number, nats: number) => Promise<T>, taken: (result: T) => boolean): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    const base = 20_000 + Math.floor(Math.random() * 12_000);
    const result = await start(base, base + 10);
    if (!taken(result) || attempt === 3) return result;
  }
}
const portTaken = /port \d+ \(.*\) is in use on 127\.0\.0\.1/;

/** Stack directories of this file: whatever a failed test left is brought down and removed. */
const dirs: string[] = [];
function stackDir(): string {
  const dir = mkdtempSync(join(tmpdir(), "ioasidctl-supervise-"));
  dirs.push(dir);
  return dir;
}

afterEach(async () => {
  for (const dir of dirs.splice(0)) {
    if (existsSync(join(dir, "stack.json"))) await stackDown({ dir }).catch(() => undefined);
    rmSync(dir, { recursive: true, force: true });
  }
});

describe("the embedded stack's supervisor (ioasidctl up)", () => {
  it("restarts a service killed with -9: a new PID serving again, `status` shows the restart, `down` stops it", async () => {
    const dir = stackDir();
    const up = await onFreePorts(
      (base, nats) => ctl(dir, ["up", "--base-port", String(base), "--nats-port", String(nats)]),
      (r) => portTaken.test(r.stderr),
    );
    expect(up.code, up.stderr).toBe(0);
    expect(up.stdout).toMatch(/supervisor\s+pid \d+/);
    const before = readState(dir);
    const killed = before.services.kvm.pid!;
    expect(alive(before.supervisor?.pid)).toBe(true);

    process.kill(killed, "SIGKILL");
    // Serving again under a new PID: the status line carries the health check's answer.
    const status = await until(
      () => ctl(dir, ["status"]).then((r) => r.stdout),
      (out) => /^kvm +pid (\d+) .* SERVING +restarts 1, last exit \(signal SIGKILL\)/m.test(out),
      30_000,
      "kvm to be restarted and SERVING",
    );
    const restarted = readState(dir).services.kvm.pid!;
    expect(restarted).not.toBe(killed);
    expect(alive(restarted)).toBe(true);
    expect(status).toMatch(new RegExp(`^kvm +pid ${restarted} `, "m"));
    // The others were not touched (their health is not asserted: one check of a busy machine may miss its deadline).
    for (const s of ["ioasid-core", "iommu", "vfio", "vdcm"] as const) {
      expect(status).toMatch(new RegExp(`^${s} +pid ${before.services[s].pid} .* restarts 0 `, "m"));
    }
    // The restart's line follows the PID's record (stack.json first: `down` must find the process).
    const log = await until(
      () => readFileSync(join(dir, "logs", "supervisor.log"), "utf8"),
      (text) => text.includes(`kvm restarted (restart 1): pid ${restarted}`),
      10_000,
      "the restart's line in supervisor.log",
    );
    expect(log).toContain(`kvm pid ${killed} ended (signal SIGKILL) after`);
    expect(log).toMatch(/kvm pid \d+ ended .*: restarting in 500 ms \(1 of at most 5 within 60 s\)/);

    const all = pidsOf(readState(dir));
    expect(all).toContain(restarted);
    const down = await ctl(dir, ["down"]);
    expect(down.code, down.stderr).toBe(0);
    expect(down.stdout).toMatch(/supervisor\s+pid \d+ stopped/);
    // Stopped by its new PID (gracefully, or killed after the grace on a busy machine).
    expect(down.stdout).toMatch(new RegExp(`^kvm +pid ${restarted} (stopped|killed)`, "m"));
    expect(all.filter(alive)).toEqual([]);
    expect(existsSync(join(dir, "stack.json"))).toBe(false);
  }, 120_000);

  it("gives up on a service that keeps failing, and says so in `status` and its log", async () => {
    const dir = stackDir();
    const up = await onFreePorts(
      (basePort, natsPort) =>
        stackUp({ dir, basePort, natsPort, insecure: true, restart: { maxRestarts: 1, initialDelayMs: 100 } }).catch((err: unknown) => err as Error),
      (r) => r instanceof Error && portTaken.test(r.message),
    );
    if (up instanceof Error) throw up;
    const first = readState(dir).services.vdcm.pid!;
    process.kill(first, "SIGKILL");
    const second = await until(
      () => readState(dir).services.vdcm.pid,
      (pid) => pid !== undefined && pid !== first,
      30_000,
      "vdcm to be restarted",
    );
    process.kill(second!, "SIGKILL");
    const status = await until(
      () => ctl(dir, ["status"]).then((r) => r.stdout),
      (out) => /^vdcm .* GAVE UP/m.test(out),
      30_000,
      "the supervisor to give vdcm up",
    );
    expect(status).toMatch(/^vdcm +pid - .*restarts 1, last exit \(signal SIGKILL\) at .*, GAVE UP: failed again after 1 restart within 60 s/m);
    expect(readFileSync(join(dir, "logs", "supervisor.log"), "utf8")).toContain(`vdcm pid ${second} ended (signal SIGKILL)`);
    expect(readState(dir).services.vdcm.pid).toBeUndefined();
    const all = pidsOf(readState(dir));
    await stackDown({ dir });
    expect(all.filter(alive)).toEqual([]);
  }, 120_000);

  it("does not restart a service with a configuration error (exit 2): `up` fails at once with why, and leaves nothing running", async () => {
    const dir = stackDir();
    // A log level no service accepts: each exits 2 before it connects anywhere.
    const up = await onFreePorts(
      (base, nats) => ctl(dir, ["up", "--base-port", String(base), "--nats-port", String(nats), "--insecure"], { ...process.env, LOG_LEVEL: "loud" }),
      (r) => portTaken.test(r.stderr),
    );
    expect(up.code).toBe(1);
    expect(up.stderr).toMatch(/ioasid-core did not come up: exited 2, a configuration error .*: not restarted/);
    expect(up.stderr).toContain("LOG_LEVEL");
    const log = readFileSync(join(dir, "logs", "supervisor.log"), "utf8");
    expect(log).toMatch(/ioasid-core pid \d+ ended \(exit code 2\)/);
    expect(log).not.toMatch(/ioasid-core restarted/);
    const started = [...log.matchAll(/started: pid (\d+)/g), ...up.stdout.matchAll(/(?:supervisor|nats-server)\s+pid (\d+)/g)].map((m) => Number(m[1]));
    expect(started.length).toBeGreaterThanOrEqual(3);
    // Killed by `up` as it failed; an orphan is reaped a moment later.
    await until(
      () => started.filter(alive),
      (left) => left.length === 0,
      10_000,
      "every process `up` started to be gone",
    );
    expect(existsSync(join(dir, "stack.json"))).toBe(false);
  }, 60_000);
});

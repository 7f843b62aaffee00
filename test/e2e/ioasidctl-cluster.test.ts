import { execFile } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, describe, expect, it } from "vitest";
import { onFreePorts, PORT_TAKEN } from "../support/free-ports.js";

// `ioasidctl up --nats-cluster 3` as a user runs it (issue 18 item 1): three nats-servers clustered
// on loopback with authorization on, the services on every server's URL, every stream with three
// replicas; the document's life cycles complete, one server is killed, `status` says so, and the
// life cycles still complete on the two left; `down` stops every server by PID.

const cli = fileURLToPath(new URL("../../packages/cli/dist/main.js", import.meta.url));
const dir = mkdtempSync(join(tmpdir(), "ioasidctl-cluster-"));

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

/**
 * A scenario, tried again (at most 4 times) when a call of it was cut by a failover or a channel
 * still connecting (UNAVAILABLE, DEADLINE_EXCEEDED, a NATS request timeout: JetStream electing leaders takes seconds, and
 * ioasidctl's calls have 5 s deadlines); any other failure — a verdict that is not clean — is final.
 */
async function scenario(kind: "normal" | "crash"): Promise<Ran> {
  let r = await ctl("scenario", "run", kind);
  for (let i = 0; i < 3 && r.code !== 0 && /UNAVAILABLE|DEADLINE_EXCEEDED|timeout|JetStream/i.test(r.stderr); i++) {
    await new Promise((resolve) => setTimeout(resolve, 1000));
    r = await ctl("scenario", "run", kind);
  }
  return r;
}

const alive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

afterAll(async () => {
  if (existsSync(join(dir, "stack.json"))) await ctl("down");
  rmSync(dir, { recursive: true, force: true });
});

describe("ioasidctl up --nats-cluster 3", () => {
  it("runs the life cycles on a three-server cluster, survives one server's death, and stops every server", async () => {
    const up = await onFreePorts(
      (base) => ctl("up", "--base-port", String(base), "--nats-port", String(base + 10), "--nats-cluster", "3"),
      (r) => PORT_TAKEN.test(r.stderr),
    );
    expect(up.code, up.stderr).toBe(0);
    expect(up.stdout).toMatch(/nats cluster +3 servers, every stream with 3 replicas, a user per role/);
    const state = JSON.parse(readFileSync(join(dir, "stack.json"), "utf8")) as { natsUrl: string; natsCluster: { name: string; pid: number }[] };
    expect(state.natsCluster.map((n) => n.name)).toEqual(["n0", "n1", "n2"]);
    expect(state.natsUrl.split(",")).toHaveLength(3);

    const status = JSON.parse((await ctl("status", "--json")).stdout) as { ok: boolean; nats: { cluster: { running: boolean }[] } };
    expect(status.ok).toBe(true);
    expect(status.nats.cluster.map((n) => n.running)).toEqual([true, true, true]);

    const normal = await scenario("normal");
    expect(normal.code, normal.stderr).toBe(0);

    // One server dies (SIGKILL): the stack is degraded, not down.
    process.kill(state.natsCluster[0]!.pid, "SIGKILL");
    for (let i = 0; i < 100 && alive(state.natsCluster[0]!.pid); i++) await new Promise((r) => setTimeout(r, 50));
    const degraded = await ctl("status");
    expect(degraded.code, "a server not running is something down").toBe(1);
    expect(degraded.stdout).toMatch(/nats-server n0 .* NOT RUNNING/);
    expect(degraded.stdout).toMatch(/nats cluster UP/);

    const crash = await scenario("crash");
    expect(crash.code, crash.stderr).toBe(0);
    expect(crash.stdout).toMatch(/ok +S9/);

    const down = await ctl("down");
    expect(down.code).toBe(0);
    for (const n of state.natsCluster) expect(alive(n.pid), `${n.name} stopped`).toBe(false);
  }, 240_000);
});

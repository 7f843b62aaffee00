import { execFile, spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { addressesOf, connectStack, readState, type StackClients } from "@ioasid/cli";
import { waitFor } from "@ioasid/testkit";

// The docker-compose `cluster` profile as a user drives it (issue 18 item 1): three nats-servers
// clustered in containers, every stream with three replicas, ioasidctl attached to all three; the
// document's life cycles complete, one nats container is killed (docker kill) in the middle of a
// crashed guest's life cycle and the stack keeps serving with a clean verdict, and the container,
// started again, catches up. scripts/test-containers.sh starts the stack and says how to reach it:
//   IOASID_CT_COMPOSE   the compose command of the running cluster stack, as a JSON array
//   IOASID_PORT_NATS, IOASID_PORT_NATS_2, IOASID_PORT_NATS_3 (and their _MONITOR ports), the
//   services' IOASID_PORT_*, DOCKER_HOST its engine

const run = promisify(execFile);
const composeEnv = process.env["IOASID_CT_COMPOSE"];
if (composeEnv === undefined) {
  throw new Error("IOASID_CT_COMPOSE is not set: run the container tests with `npm run test:containers` (it starts the compose stack)");
}
const compose = JSON.parse(composeEnv) as string[];
const cli = fileURLToPath(new URL("../../packages/cli/dist/main.js", import.meta.url));
const dir = mkdtempSync(join(tmpdir(), "ioasid-containers-cluster-"));
const log = (line: string): void => console.log(`containers: cluster: ${line}`);

function port(variable: string): number {
  const raw = process.env[variable];
  const n = Number(raw);
  if (raw === undefined || !Number.isInteger(n) || n < 1 || n > 65535) throw new Error(`${variable} is not set to a port (got ${raw ?? "nothing"})`);
  return n;
}

/** The three nats-servers: compose service, server name (its --server_name), client and monitoring ports. */
const NODES = [
  { service: "nats", name: "nats-1", port: port("IOASID_PORT_NATS"), monitor: port("IOASID_PORT_NATS_MONITOR") },
  { service: "nats-2", name: "nats-2", port: port("IOASID_PORT_NATS_2"), monitor: port("IOASID_PORT_NATS_2_MONITOR") },
  { service: "nats-3", name: "nats-3", port: port("IOASID_PORT_NATS_3"), monitor: port("IOASID_PORT_NATS_3_MONITOR") },
] as const;
const FIVE = ["ioasid-core", "iommu", "vfio", "kvm", "vdcm"] as const;
const natsUrl = NODES.map((n) => `nats://127.0.0.1:${n.port}`).join(",");

interface Run {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

async function exec(file: string, args: readonly string[], timeoutMs = 60_000): Promise<Run> {
  try {
    const { stdout, stderr } = await run(file, [...args], { timeout: timeoutMs, maxBuffer: 16 << 20 });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code?: number | string; stdout?: string; stderr?: string; message: string };
    return { code: typeof e.code === "number" ? e.code : -1, stdout: e.stdout ?? "", stderr: e.stderr ?? e.message };
  }
}

/** ioasidctl with this test's --dir; throws with its output when it fails. */
async function ctl(...args: string[]): Promise<string> {
  const r = await exec(process.execPath, [cli, ...args, "--dir", dir]);
  if (r.code !== 0) throw new Error(`ioasidctl ${args.join(" ")} exited ${r.code}:\n${r.stdout}${r.stderr}`);
  return r.stdout;
}

async function composeRun(...args: string[]): Promise<string> {
  const r = await exec(compose[0]!, [...compose.slice(1), ...args], 120_000);
  if (r.code !== 0) throw new Error(`${compose.join(" ")} ${args.join(" ")} exited ${r.code}:\n${r.stdout}${r.stderr}`);
  return r.stdout;
}

async function docker(...args: string[]): Promise<string> {
  const r = await exec("docker", args);
  if (r.code !== 0) throw new Error(`docker ${args.join(" ")} exited ${r.code}:\n${r.stderr}`);
  return r.stdout.trim();
}

async function containerOf(service: string): Promise<string> {
  const id = (await composeRun("ps", "-q", service)).trim();
  if (id === "") throw new Error(`compose has no container for ${service}`);
  return id;
}
const stateOf = (id: string): Promise<string> => docker("inspect", "-f", "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}-{{end}}", id);

async function monitor(n: (typeof NODES)[number], path: string): Promise<Record<string, unknown>> {
  const res = await fetch(`http://127.0.0.1:${n.monitor}${path}`, { signal: AbortSignal.timeout(5000) });
  return (await res.json()) as Record<string, unknown>;
}

interface StreamReplicas {
  readonly name: string;
  readonly replicas: number;
  readonly leader: string | undefined;
  /** The followers, each with whether it is current and online. */
  readonly followers: ReadonlyArray<{ name: string; current: boolean; offline?: boolean }>;
}

/** Every JetStream stream of the stack and its replicas, asked as the operator through any server. */
async function streams(c: StackClients): Promise<StreamReplicas[]> {
  const request = async (subject: string): Promise<Record<string, unknown>> =>
    JSON.parse((await c.nc.request(subject, undefined, { timeout: 5000 })).string()) as Record<string, unknown>;
  const names = ((await request("$JS.API.STREAM.NAMES"))["streams"] as string[] | null) ?? [];
  const out: StreamReplicas[] = [];
  for (const name of names.sort()) {
    const info = await request(`$JS.API.STREAM.INFO.${name}`);
    if (info["error"] !== undefined) throw new Error(`stream ${name}: ${JSON.stringify(info["error"])}`);
    const config = info["config"] as { num_replicas: number };
    const cluster = info["cluster"] as { leader?: string; replicas?: StreamReplicas["followers"] } | undefined;
    out.push({ name, replicas: config.num_replicas, leader: cluster?.leader, followers: cluster?.replicas ?? [] });
  }
  return out;
}

/** Every stream led, with its two followers current and online (bounded: JetStream catches up in seconds). */
async function untilStreamsCurrent(c: StackClients, timeoutMs: number): Promise<StreamReplicas[]> {
  let last: StreamReplicas[] = [];
  await waitFor(
    async () => {
      last = await streams(c);
      return (
        last.length > 0 && last.every((s) => s.leader !== undefined && s.followers.length === 2 && s.followers.every((f) => f.current && f.offline !== true))
      );
    },
    { timeoutMs, intervalMs: 250, message: "every stream to have a leader and two current followers" },
  ).catch((err: unknown) => {
    throw new Error(`${(err as Error).message}: ${JSON.stringify(last)}`, { cause: err });
  });
  return last;
}

const TRANSIENT = /UNAVAILABLE|DEADLINE_EXCEEDED|timeout|timed out|JetStream|503|no responders/i;
/** At most this many runs of a scenario a nats-server's death may have cut. */
const TRIES = 3;

/**
 * `ioasidctl scenario run KIND`, its progress lines passed to `onLine` as they come. Bounded by a
 * timeout (the child is killed past it).
 */
function scenario(kind: "normal" | "crash", onLine: (line: string) => void = () => undefined, timeoutMs = 120_000): Promise<Run> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [cli, "scenario", "run", kind, "--dir", dir], { stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    let partial = "";
    child.stdout.setEncoding("utf8").on("data", (d: string) => {
      stdout += d;
      const lines = (partial + d).split("\n");
      partial = lines.pop() ?? "";
      for (const l of lines) onLine(l);
    });
    child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    const timer = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
    child.on("close", (code) => {
      clearTimeout(timer);
      resolve({ code: code ?? -1, stdout, stderr });
    });
  });
}

/** What a scenario's verdict says: its check lines, and the ones that failed. */
function verdictOf(r: Run): { checks: string[]; failed: string[] } {
  const checks = r.stdout.split("\n").filter((l) => /^\s+(ok|FAIL)\s/.test(l));
  return { checks, failed: checks.filter((l) => /^\s+FAIL/.test(l)) };
}

let clients: StackClients | undefined;
/** A nats container this file killed and has not seen running again: started in afterAll. */
let killedService: string | undefined;

beforeAll(async () => {
  const out = await ctl("attach", "--nats", natsUrl, "--timeout-ms", "60000");
  log(`ioasidctl attach --nats ${natsUrl} --dir ${dir}\n${out.trimEnd()}`);
  clients = await connectStack(addressesOf(readState(dir)));
});

afterAll(async () => {
  await clients?.close();
  // Leave the stack whole for the script's graceful-stop check, whatever failed.
  if (killedService !== undefined) await composeRun("start", killedService).catch((err: unknown) => log(`could not start ${killedService}: ${String(err)}`));
  const vms = join(dir, "vms.json");
  if (existsSync(vms)) {
    for (const vm of JSON.parse(readFileSync(vms, "utf8")) as Array<{ agentPid: number }>) {
      try {
        process.kill(vm.agentPid, "SIGKILL");
      } catch {
        // already gone
      }
    }
  }
  rmSync(dir, { recursive: true, force: true });
});

describe("the docker-compose cluster profile (three nats-servers), driven by ioasidctl", () => {
  it("runs three routed nats-servers, each JetStream-healthy, and all five services SERVING on them", async () => {
    const status = await ctl("status");
    for (const s of FIVE) expect(status).toMatch(new RegExp(`^${s}\\s.*SERVING`, "m"));
    for (const s of [...NODES.map((n) => n.service), ...FIVE]) expect(await stateOf(await containerOf(s)), s).toBe("running healthy");
    for (const n of NODES) {
      const varz = await monitor(n, "/varz");
      const routez = await monitor(n, "/routez");
      expect(varz["server_name"]).toBe(n.name);
      expect((varz["cluster"] as { name?: string }).name).toBe("ioasid");
      // Routes to the two others (the route to itself is dropped).
      expect(routez["num_routes"], `${n.name}'s routes`).toBe(2);
      expect(await monitor(n, "/healthz")).toEqual({ status: "ok" });
    }
    const meta = (await monitor(NODES[0], "/jsz"))["meta_cluster"] as { leader?: string; cluster_size?: number };
    expect(meta.cluster_size).toBe(3);
    log(`nats-1, nats-2, nats-3: cluster "ioasid", two routes each, JetStream meta leader ${meta.leader ?? "?"}`);
  });

  it("keeps every stream the services made with three replicas, led and current", async () => {
    const all = await untilStreamsCurrent(clients!, 30_000);
    expect(all.map((s) => s.name)).toContain("IOASID_CORE_OPS");
    for (const s of all) expect(s.replicas, s.name).toBe(3);
    log(`${all.length} streams, each with 3 replicas: ${all.map((s) => `${s.name} (leader ${s.leader ?? "?"})`).join(", ")}`);
  });

  it("runs the normal life cycle (steps 1–24) with every invariant ok", async () => {
    const started = Date.now();
    const r = await scenario("normal");
    const { checks, failed } = verdictOf(r);
    log(`scenario run normal: exit ${r.code} in ${Date.now() - started} ms\n${checks.join("\n")}`);
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(checks.length).toBeGreaterThan(5);
    expect(failed).toEqual([]);
  });

  it("runs the crashed-guest life cycle with the op log's nats container killed mid-run, keeps serving, and the container catches up once started again", async () => {
    const c = clients!;
    // The node that leads the core's operation log: its death makes JetStream elect a new
    // leader for the stream every operation is written to.
    const oplog = (await untilStreamsCurrent(c, 30_000)).find((s) => s.name === "IOASID_CORE_OPS");
    const victim = NODES.find((n) => n.name === oplog?.leader);
    expect(victim, `the op log's leader (${oplog?.leader ?? "none"}) is one of the three`).toBeDefined();
    const id = await containerOf(victim!.service);
    const restartsBefore = Object.fromEntries(
      await Promise.all(FIVE.map(async (s) => [s, await docker("inspect", "-f", "{{.RestartCount}}", await containerOf(s))] as const)),
    );

    // The kill comes once the guest's PASID is bound (steps 3–7 done): the crash, the FREE and
    // its deliveries, the reclaim and the late unbind all run on the two nodes left. A run the
    // failover cut (a call that failed UNAVAILABLE, DEADLINE_EXCEEDED or a NATS/JetStream
    // timeout while leaders were elected: seconds) is run again, at most TRIES times in all;
    // any other failure, a verdict that is not clean above all, is final.
    let killedAt = 0;
    let kill: Promise<void> | undefined;
    const killOnce = (line: string): void => {
      if (kill !== undefined || !/^\[crash\] 3-7 /.test(line)) return;
      kill = (async () => {
        await docker("kill", "--signal", "KILL", id);
        killedAt = Date.now();
        killedService = victim!.service;
      })();
    };
    let r: Run | undefined;
    const attempts: string[] = [];
    for (let i = 0; i < TRIES; i++) {
      const started = Date.now();
      r = await scenario("crash", killOnce);
      await kill;
      attempts.push(`exit ${r.code} in ${Date.now() - started} ms${r.code === 0 ? "" : `: ${(r.stderr.trim().split("\n").at(-1) ?? "").slice(0, 200)}`}`);
      if (r.code === 0 || !TRANSIENT.test(r.stderr)) break;
    }
    expect(kill, "the scenario reached step 3–7 and the container was killed").toBeDefined();
    await waitFor(async () => (await stateOf(id)).startsWith("exited"), { timeoutMs: 10_000, message: `the ${victim!.service} container to exit` });
    const { checks, failed } = verdictOf(r!);
    log(`killed ${victim!.service} (${victim!.name}, leader of IOASID_CORE_OPS) with SIGKILL at step 3–7 of the crashed-guest life cycle`);
    log(`scenario run crash: ${attempts.length} run(s): ${attempts.join("; ")}\n${checks.join("\n")}`);
    expect(r!.code, r!.stdout + r!.stderr).toBe(0);
    expect(checks.length).toBeGreaterThan(5);
    expect(failed).toEqual([]);
    expect(r!.stdout).toMatch(/ok +S9/);

    // Still serving on two of three: every service answers, no service container died, and
    // every stream has a leader again (its follower on the dead node offline).
    const status = await ctl("status");
    for (const s of FIVE) expect(status).toMatch(new RegExp(`^${s}\\s.*SERVING`, "m"));
    for (const s of FIVE) {
      const sid = await containerOf(s);
      expect(await stateOf(sid), s).toBe("running healthy");
      expect(await docker("inspect", "-f", "{{.RestartCount}}", sid), `${s} restarts`).toBe(restartsBefore[s]);
    }
    const degraded = await streams(c);
    expect(degraded.filter((s) => s.leader === undefined || s.leader === victim!.name).map((s) => s.name)).toEqual([]);
    log(`on two nodes: all five services SERVING, none restarted; stream leaders ${degraded.map((s) => `${s.name}=${s.leader ?? "?"}`).join(", ")}`);

    // Started again, the node catches up: healthy (current with the meta leader), every
    // stream's replicas current again, and a guest's life cycle on the whole cluster.
    const startedAt = Date.now();
    await composeRun("start", victim!.service);
    await waitFor(async () => (await stateOf(id)) === "running healthy", {
      timeoutMs: 90_000,
      intervalMs: 500,
      message: `${victim!.service} to be healthy again`,
    });
    killedService = undefined;
    const healed = await untilStreamsCurrent(c, 60_000);
    for (const s of healed) expect(s.replicas, s.name).toBe(3);
    log(
      `${victim!.service} healthy ${Date.now() - startedAt} ms after \`${compose[0]} start\` (${Date.now() - killedAt} ms after the kill); every stream's 3 replicas current`,
    );
    const again = await scenario("normal");
    expect(again.code, again.stdout + again.stderr).toBe(0);
    expect(verdictOf(again).failed).toEqual([]);
    log(`scenario run normal on the healed cluster: exit ${again.code}`);
  }, 400_000);
});

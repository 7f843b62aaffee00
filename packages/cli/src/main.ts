#!/usr/bin/env node
import { spawn } from "node:child_process";
import { existsSync, mkdirSync, openSync, closeSync, readFileSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join, resolve } from "node:path";
import { parseArgs, type ParseArgsConfig } from "node:util";
import { readHistory } from "@ioasid/bus";
import { isDomainError } from "@ioasid/errors";
import { decodeVfioCapability, packageVersion } from "@ioasid/grpc-kit";
import { iommu, kvm, vdcm, vfio } from "@ioasid/proto";
import { attachCommands } from "./attach.js";
import { chaosCommand } from "./chaos-command.js";
import { conformCommand } from "./conform-command.js";
import { addressesOf, connectServices, connectStack, type StackClients } from "./clients.js";
import { faultCommands } from "./fault-commands.js";
import { deviceCommands } from "./device-commands.js";
import { viommuCommands } from "./viommu-commands.js";
import { holderCommands } from "./holder.js";
import { gatherInspect, inspectJson, renderInspectText, type InspectSnapshot } from "./inspect.js";
import { runScenario, ScenarioKind, type ScenarioResult } from "./scenario.js";
import { readState, stackDown, stackUp } from "./stack.js";
import { buildStateGraph, renderStateHtml, renderStateMermaid } from "./state-graph.js";
import { stackStatus } from "./status.js";
import { describeSupervision, describeSupervisor } from "./supervision-report.js";
import { buildTimeline, renderTable } from "./timeline.js";
import { renderHtml } from "./timeline-diagram.js";
import { renderVerdict } from "./verdict.js";
import { EXIT_CODES_HELP, ExitCode, noPositionals, parseCount, parseU64, parseVerb, requireString, UsageError } from "./usage-error.js";
import { runVmmAgent } from "./vmm-agent.js";

const out = (s = "") => process.stdout.write(`${s}\n`);
const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);
/** Output for scripts: a message's proto3 JSON mapping (ts-proto's `toJSON`), never ts-proto's internals. */
const json = (v: unknown) => JSON.stringify(v, null, 2);

interface Command {
  readonly summary: string;
  readonly usage: string;
  readonly options: NonNullable<ParseArgsConfig["options"]>;
  readonly run: (values: Record<string, string | boolean | undefined>, positionals: string[]) => Promise<number>;
}

const dirOption = { dir: { type: "string", default: ".ioasid" } } as const;

/** The VFIO capabilities of the VMs this directory's `vm create` started: the commands act for them. */
function vmCapabilities(dir: string): Array<readonly [number, Uint8Array]> {
  return readVms(dir).flatMap((vm) => {
    const capability = vm.capability === undefined ? undefined : decodeVfioCapability(vm.capability);
    return capability === undefined ? [] : [[vm.containerId, capability] as const];
  });
}

/** Runs `fn` with clients of the stack in `dir`. */
async function withStack<T>(dir: string, fn: (c: StackClients) => Promise<T>): Promise<T> {
  const c = await connectStack(addressesOf(readState(dir)), vmCapabilities(dir));
  try {
    return await fn(c);
  } finally {
    await c.close();
  }
}

interface VmRecord {
  readonly name: string;
  readonly mmToken: string;
  readonly vmId: number;
  readonly containerId: number;
  readonly setId: number;
  readonly agentPid: number;
  /** The container's VFIO capability (hex), as the VMM printed it; absent in records of earlier versions. */
  readonly capability?: string;
  /**
   * `vm crash` killed its VMM: VFIO closed the container, but the KVM VM stays until `vm destroy`
   * (a record dropped at the crash left a VM nothing could list or destroy, and its name taken).
   */
  readonly crashed?: boolean;
}
const vmsFile = (dir: string) => join(resolve(dir), "vms.json");
function readVms(dir: string): VmRecord[] {
  return existsSync(vmsFile(dir)) ? (JSON.parse(readFileSync(vmsFile(dir), "utf8")) as VmRecord[]) : [];
}
function writeVms(dir: string, vms: VmRecord[]): void {
  // Owner-only: it holds the VMs' capabilities.
  writeFileSync(vmsFile(dir), JSON.stringify(vms, null, 2), { mode: 0o600 });
}
/**
 * The VM named, or the only VM when none is named. No name with several VMs (or none) is a usage
 * error; a name that is not a VM is a failure (exit 1).
 */
function findVm(dir: string, name: string | undefined, flag = "vm"): VmRecord {
  const vms = readVms(dir);
  const names = vms.map((v) => v.name).join(", ") || "none";
  if (name === undefined) {
    if (vms.length === 1) return vms[0]!;
    throw new UsageError(`--${flag} NAME is required (VMs: ${names})`);
  }
  const vm = vms.find((v) => v.name === name);
  if (vm === undefined) throw new Error(`no VM named ${name}; VMs: ${names}`);
  return vm;
}

async function printScenario(r: ScenarioResult): Promise<void> {
  const title = r.kind === "normal" ? "Guest IOASID life cycle (normal), steps 1–24" : "Misbehaving guest: free before unbind, steps 13–30";
  out();
  out(renderTable(r.rows, { title: `${title} — host PASID ${r.hpasid}, guest PASID ${r.gpasid}, set ${r.setId}` }));
  for (const n of r.notes) out(`  · ${n}`);
  out(renderVerdict(r.verdict));
}

function mermaidJs(): string {
  const req = createRequire(import.meta.url);
  return readFileSync(req.resolve("mermaid/dist/mermaid.min.js"), "utf8");
}

const commands: Record<string, Command> = {
  up: {
    summary: "start the embedded stack: nats-server and the five services as processes",
    usage:
      "ioasidctl up [--dir .ioasid] [--base-port 50051] [--nats-port 4222] [--nats-url URL[,URL…]] [--nats-cluster 3] [--standby-core] [--insecure]\n" +
      "  --nats-cluster N: N nats-servers clustered on loopback (clients on nats-port … nats-port+N-1, routes on nats-port+100 …),\n" +
      "  JetStream on each, every stream with min(N, 3) replicas; the services get every server's URL and ride reconnects.\n" +
      "  --standby-core: a second core (ioasid-core-b, gRPC on base-port+10, metrics base-port+15) waits behind the serving core's\n" +
      "  lease (1 s; 3 s on a cluster) and takes over when it dies; the roles and ioasidctl get both addresses and follow it; the\n" +
      "  supervisor brings a dead core back as the standby. `status` shows the one waiting as STANDBY.\n" +
      "  Authenticated by default: a NATS user per role instance with its role's permissions, credentials in <dir>/credentials.\n" +
      "  Ports: gRPC on base-port … base-port+4 (core, iommu, vfio, kvm, vdcm), Prometheus metrics (GET /metrics on 127.0.0.1)\n" +
      "  on base-port+5 … base-port+9 in the same order (`status` lists the URLs).\n" +
      "  --insecure: no authorization (debugging only; anyone reaching NATS may forge deliveries). With --nats-url, that server's own rules apply.\n" +
      "  Supervised (DESIGN §13, like compose's restart: on-failure): a supervisor process starts the services and restarts one that\n" +
      "  fails (a non-zero exit or a signal) after 0.5 s, doubling to 10 s; it gives up after 5 restarts within 60 s. A service\n" +
      "  that exits 0 (stopped by hand) or 2 (a configuration error) is not restarted. Each exit and restart is a line of\n" +
      "  <dir>/logs/supervisor.log; `status` shows restarts and the last exit; nats-server is not restarted.",
    options: {
      ...dirOption,
      "base-port": { type: "string" },
      "nats-port": { type: "string" },
      "nats-url": { type: "string" },
      "nats-cluster": { type: "string" },
      "standby-core": { type: "boolean", default: false },
      insecure: { type: "boolean", default: false },
    },
    run: async (v, pos) => {
      noPositionals(pos, "up");
      const natsCluster = v["nats-cluster"] === undefined ? undefined : parseCount(v["nats-cluster"], "nats-cluster", 7);
      if (natsCluster !== undefined && natsCluster < 1) throw new UsageError("--nats-cluster must be 1..7 servers");
      if (natsCluster !== undefined && v["nats-url"] !== undefined) throw new UsageError("--nats-cluster starts servers of its own: not with --nats-url");
      await stackUp({
        dir: v["dir"] as string,
        insecure: v["insecure"] as boolean,
        ...(v["base-port"] === undefined ? {} : { basePort: parseCount(v["base-port"], "base-port", 65535) }),
        ...(v["nats-port"] === undefined ? {} : { natsPort: parseCount(v["nats-port"], "nats-port", 65535) }),
        ...(v["nats-url"] === undefined ? {} : { natsUrl: v["nats-url"] as string }),
        ...(natsCluster === undefined ? {} : { natsCluster }),
        standbyCore: v["standby-core"] as boolean,
        log: out,
      });
      out(`stack up (state in ${resolve(v["dir"] as string)}/stack.json); \`ioasidctl down\` stops it`);
      return 0;
    },
  },
  down: {
    summary: "stop the stack started by `up` (by PID) and remove its state",
    usage:
      "ioasidctl down [--dir .ioasid] [--purge]   (--purge also deletes logs and the JetStream store)\n" +
      "  Stops the supervisor first (so that it restarts nothing), then each service by the PID stack.json records now, then nats-server.",
    options: { ...dirOption, purge: { type: "boolean", default: false } },
    run: async (v, pos) => {
      noPositionals(pos, "down");
      for (const vm of readVms(v["dir"] as string)) {
        // A crashed VM's VMM is dead: its PID may be another process's by now.
        if (vm.crashed === true) continue;
        try {
          process.kill(vm.agentPid, "SIGTERM");
        } catch {
          // already gone
        }
      }
      await stackDown({ dir: v["dir"] as string, purge: v["purge"] as boolean, log: out });
      if (!(v["purge"] as boolean)) writeVms(v["dir"] as string, []);
      out("stack down");
      return 0;
    },
  },
  status: {
    summary: "show the stack's processes, their health, and their restarts",
    usage:
      "ioasidctl status [--dir .ioasid] [--json]\n" +
      "  One line per process: PID, address, health, then what the supervisor did (restarts, the last exit and when;\n" +
      "  RESTARTING, STOPPED or GAVE UP with why), and its metrics URL.\n" +
      "  Exit 1 when anything is down: NATS not accepting a connection, a service not SERVING, the supervisor not running;\n" +
      "  with --standby-core, a core that runs without listening is STANDBY (the other holds its lease) or TAKING_OVER (it\n" +
      "  holds the lease, replaying), and the pair is up when one is SERVING and the other SERVING or STANDBY.\n" +
      "  --json: {ok, nats: {url, pid, external, up, error?}, supervisor: {pid, running, log} | null,\n" +
      "  services: [{name, pid, address, metrics?, health (SERVING, NOT_SERVING, … DOWN, or STANDBY: a core of a pair waiting behind\n" +
      "  the other's lease), error?, restarts?, lastExit?, supervision?, log}]} (with --standby-core, ioasid-core-b is one of them).",
    options: { ...dirOption, json: { type: "boolean", default: false } },
    run: async (v, pos) => {
      noPositionals(pos, "status");
      const report = await stackStatus(readState(v["dir"] as string));
      if (v["json"] as boolean) out(JSON.stringify(report, null, 2));
      else {
        const { nats, supervisor } = report;
        if (nats.cluster !== undefined) {
          out(`nats cluster ${nats.up ? "UP" : `DOWN (${nats.error})`}`);
          for (const n of nats.cluster) out(`  nats-server ${n.name} ${n.url} pid ${n.pid} ${n.running ? "RUNNING" : "NOT RUNNING"}`);
        } else out(`nats ${nats.url}${nats.external ? " (external)" : ` pid ${nats.pid}`} ${nats.up ? "UP" : `DOWN (${nats.error})`}`);
        if (supervisor !== null) out(describeSupervisor({ pid: supervisor.pid ?? undefined, log: supervisor.log }));
        for (const s of report.services) {
          const health = s.error === undefined ? s.health : `${s.health} (${s.error})`;
          const supervision = s.restarts === undefined ? "" : `   ${describeSupervision({ ...s, pid: s.pid ?? undefined })}`;
          const metrics = s.metrics === undefined ? "" : `   metrics ${s.metrics}`;
          out(`${s.name.padEnd(12)} pid ${String(s.pid ?? "-").padEnd(7)} ${s.address.padEnd(16)} ${health}${supervision}${metrics}   log ${s.log}`);
        }
      }
      return report.ok ? ExitCode.OK : ExitCode.FAILED;
    },
  },
  inspect: {
    summary: "sets, IOASIDs (state, references and holders) and every role's tables; --html draws them",
    usage:
      "ioasidctl inspect [--dir .ioasid] [--json | --mermaid] [--html FILE]\n" +
      "  Asks each service on its own: one that does not answer is shown as `kvm: UNREACHABLE (why)`, the others still are,\n" +
      "  and the exit status is 1.\n" +
      "  --json: {stats, sets, ioasids, registrations, vfio, kvm, vdcm, iommu, unreachable}, each in the proto3 JSON mapping of its\n" +
      "  response (enum names, 64-bit integers as decimal strings, bytes as base64, fields at their default omitted); a section\n" +
      '  whose service did not answer is null and named in unreachable ({kvm: "why"}; {} when all answered).\n' +
      "  --mermaid: the picture as a Mermaid flowchart instead of the report: sets -> IOASIDs -> holders -> hardware entries\n" +
      "  (KVM VMCS translations, VDCM work-queue PASID entries, IOMMU PASID-table entries).\n" +
      "  --html FILE: the same picture drawn as SVG, with the report, in one self-contained page (no script, nothing fetched).",
    options: { ...dirOption, json: { type: "boolean", default: false }, mermaid: { type: "boolean", default: false }, html: { type: "string" } },
    run: async (v, pos) => {
      noPositionals(pos, "inspect");
      if ((v["json"] as boolean) && (v["mermaid"] as boolean)) throw new UsageError("give at most one of --json and --mermaid");
      const dir = v["dir"] as string;
      // No NATS: inspect asks the services only, each on its own, so one down hides nothing else.
      const c = connectServices(addressesOf(readState(dir)), vmCapabilities(dir));
      let snapshot: InspectSnapshot;
      try {
        snapshot = await gatherInspect(c);
      } finally {
        await c.close();
      }
      if (v["json"] as boolean) out(json(inspectJson(snapshot)));
      else if (v["mermaid"] as boolean) out(renderStateMermaid(buildStateGraph(snapshot)));
      else out(renderInspectText(snapshot));
      if (v["html"] !== undefined) {
        writeFileSync(v["html"] as string, renderStateHtml(snapshot, { takenAt: new Date() }));
        // The report or the JSON is stdout's: the file's name goes to stderr.
        process.stderr.write(`wrote ${resolve(v["html"] as string)}\n`);
      }
      return Object.keys(snapshot.unreachable).length === 0 ? ExitCode.OK : ExitCode.FAILED;
    },
  },
  timeline: {
    summary: "render the recorded history as the document's column table (and as Mermaid HTML)",
    usage:
      "ioasidctl timeline [--dir .ioasid] [--ioasid N] [--since-ms EPOCH_MS] [--html FILE]\n" +
      "  The document's column table (a long step wraps within its column).\n" +
      "  --html FILE: a Mermaid sequence diagram (Mermaid inlined, renders offline): each delivery core -> tier and its ack back,\n" +
      "  tiers in delivery order KVM (CPU) -> VDCM (device) -> IOMMU, a state and reference-count band per IOASID, the IO page\n" +
      "  fault hand-offs IOMMU -> VFIO -> guest and back.\n" +
      "  --ioasid N: the steps about IOASID N and about its sets; exit 1 with a message when the history has no IOASID N.",
    options: { ...dirOption, ioasid: { type: "string" }, "since-ms": { type: "string" }, html: { type: "string" } },
    run: async (v, pos) => {
      noPositionals(pos, "timeline");
      const ioasid = v["ioasid"] === undefined ? undefined : parseCount(v["ioasid"], "ioasid");
      const sinceMs = v["since-ms"] === undefined ? undefined : parseCount(v["since-ms"], "since-ms");
      return withStack(v["dir"] as string, async (c) => {
        const records = await readHistory(c.nc, sinceMs === undefined ? {} : { sinceMs });
        let filter = {};
        if (ioasid !== undefined) {
          // The IOASID's steps and its sets' steps about no IOASID: without the sets, every record
          // about no IOASID passed the filter (19 unrelated rows for an IOASID that never existed).
          const setIds = new Set(records.flatMap((r) => (r.ioasid === ioasid && r.setId !== undefined ? [r.setId] : [])));
          if (!records.some((r) => r.ioasid === ioasid)) {
            process.stderr.write(`ioasidctl timeline: no IOASID ${ioasid} in the history${sinceMs === undefined ? "" : ` since ${sinceMs}`}\n`);
            return ExitCode.FAILED;
          }
          filter = { ioasids: new Set([ioasid]), setIds };
        }
        const rows = buildTimeline(records, filter);
        out(renderTable(rows));
        if (v["html"] !== undefined) {
          writeFileSync(v["html"] as string, renderHtml([{ title: "timeline", rows }], mermaidJs()));
          out(`\nwrote ${resolve(v["html"] as string)}`);
        }
        return 0;
      });
    },
  },
  scenario: {
    summary: "run a life cycle of the document through the stack: `scenario run normal|crash`",
    usage: "ioasidctl scenario run normal|crash [--dir .ioasid] [--html FILE]",
    options: { ...dirOption, html: { type: "string" } },
    run: async (v, pos) => {
      const kind = pos[1];
      if (pos[0] !== "run" || (kind !== "normal" && kind !== "crash") || pos.length > 2)
        throw new UsageError(`scenario takes \`run normal\` or \`run crash\`${pos.length === 0 ? "" : ` (got "${pos.join(" ")}")`}`);
      return withStack(v["dir"] as string, async (c) => {
        const r = await runScenario(kind as ScenarioKind, c, { log: out });
        await printScenario(r);
        if (v["html"] !== undefined) {
          writeFileSync(v["html"] as string, renderHtml([{ title: kind, rows: r.rows, verdict: renderVerdict(r.verdict) }], mermaidJs()));
          out(`wrote ${resolve(v["html"] as string)}`);
        }
        return r.verdict.ok ? 0 : 1;
      });
    },
  },
  demo: {
    summary: "up, both scenarios with their timelines and verdicts, down",
    usage: "ioasidctl demo [--dir .ioasid-demo] [--html FILE] [--base-port 50151] [--nats-port 4322] [--insecure]",
    options: {
      insecure: { type: "boolean", default: false },
      dir: { type: "string", default: ".ioasid-demo" },
      html: { type: "string", default: "ioasid-timeline.html" },
      "base-port": { type: "string", default: "50151" },
      "nats-port": { type: "string", default: "4322" },
    },
    run: async (v, pos) => {
      noPositionals(pos, "demo");
      const dir = v["dir"] as string;
      await stackUp({
        dir,
        basePort: parseCount(v["base-port"], "base-port", 65535),
        natsPort: parseCount(v["nats-port"], "nats-port", 65535),
        log: out,
        freshStore: true,
        insecure: v["insecure"] as boolean,
      });
      let ok = false;
      try {
        ok = await withStack(dir, async (c) => {
          const normal = await runScenario(ScenarioKind.NORMAL, c, { log: out });
          await printScenario(normal);
          const crash = await runScenario(ScenarioKind.CRASH, c, { log: out });
          await printScenario(crash);
          writeFileSync(
            v["html"] as string,
            renderHtml(
              [
                { title: "Guest IOASID life cycle (normal)", rows: normal.rows, verdict: renderVerdict(normal.verdict) },
                { title: "Misbehaving guest: free before unbind", rows: crash.rows, verdict: renderVerdict(crash.verdict) },
              ],
              mermaidJs(),
            ),
          );
          out(`\nwrote ${resolve(v["html"] as string)} (Mermaid sequence diagrams, self-contained)`);
          const all = normal.verdict.ok && crash.verdict.ok;
          out(`\nverdict on DESIGN §7 invariants: ${all ? "ALL CLEAR" : "VIOLATIONS (see above)"}`);
          return all;
        });
      } finally {
        await stackDown({ dir, log: out });
      }
      return ok ? 0 : 1;
    },
  },
  vm: {
    summary: "VMM actions: `vm create|crash|destroy|list`",
    usage:
      "ioasidctl vm create --name NAME --token MM_TOKEN [--quota 64] [--vcpus 2]   (starts a VMM process holding the VFIO session)\n" +
      "ioasidctl vm crash --name NAME     (SIGKILL the VMM: the crashed-guest path; the VM stays listed, CRASHED, until destroyed)\n" +
      "ioasidctl vm destroy --name NAME   (clean close, then KVM DestroyVm; of a crashed VM, DestroyVm)\n" +
      "ioasidctl vm list",
    options: {
      ...dirOption,
      name: { type: "string" },
      token: { type: "string" },
      quota: { type: "string", default: "64" },
      vcpus: { type: "string", default: "2" },
    },
    run: async (v, pos) => {
      const dir = v["dir"] as string;
      const verb = parseVerb(pos, ["create", "crash", "destroy", "list"], "vm");
      if (verb === "list") {
        for (const vm of readVms(dir))
          out(
            `${vm.name}  token ${vm.mmToken}  vm ${vm.vmId}  container ${vm.containerId}  set ${vm.setId}  ${vm.crashed === true ? "CRASHED (VMM killed; `vm destroy` removes the VM)" : `vmm pid ${vm.agentPid}`}`,
          );
        return 0;
      }
      if (verb === "create") {
        const name = requireString(v["name"], "name");
        const token = parseU64(v["token"], "token");
        const vcpuCount = parseCount(v["vcpus"], "vcpus");
        const quota = parseCount(v["quota"], "quota");
        const existing = readVms(dir).find((x) => x.name === name);
        if (existing !== undefined)
          throw new Error(`vm ${name} exists${existing.crashed === true ? " (crashed)" : ""}: \`ioasidctl vm destroy --name ${name}\` first`);
        const state = readState(dir);
        const vmId = await withStack(dir, async (c) => (await c.kvm.createVm(P(kvm.CreateVmRequest, { mmToken: token, vcpuCount, vmName: name }))).vm!.vmId);
        mkdirSync(join(resolve(dir), "logs"), { recursive: true });
        const logFile = join(resolve(dir), "logs", `vmm-${name}.log`);
        const fd = openSync(logFile, "w");
        const agent = spawn(
          process.execPath,
          [process.argv[1]!, "vmm-agent", "--vfio", state.services.vfio.address, "--token", String(token), "--quota", String(quota), "--name", name],
          {
            detached: true,
            stdio: ["ignore", fd, fd],
            // The VMM's certificate (a stack with mTLS): VMMs reach VFIO only.
            env: { ...process.env, IOASID_CREDENTIALS_DIR: state.vmmCredentials ?? "" },
          },
        );
        agent.unref();
        closeSync(fd);
        const deadline = Date.now() + 10_000;
        let info: { containerId: number; setId: number; capability?: string } | undefined;
        while (info === undefined && Date.now() < deadline) {
          const line = readFileSync(logFile, "utf8")
            .split("\n")
            .find((l) => l.startsWith("{"));
          if (line !== undefined) info = JSON.parse(line) as { containerId: number; setId: number; capability?: string };
          else await new Promise((r) => setTimeout(r, 50));
        }
        if (info === undefined) throw new Error(`the VMM did not open its container: ${readFileSync(logFile, "utf8")}`);
        writeVms(dir, [
          ...readVms(dir).filter((x) => x.name !== name),
          {
            name,
            mmToken: String(token),
            vmId,
            containerId: info.containerId,
            setId: info.setId,
            agentPid: agent.pid!,
            ...(info.capability === undefined ? {} : { capability: info.capability }),
          },
        ]);
        out(`vm ${name}: kvm vm ${vmId}, vfio container ${info.containerId}, set ${info.setId}, VMM pid ${agent.pid}`);
        return 0;
      }
      const vm = findVm(dir, v["name"] as string | undefined, "name");
      if (verb === "crash") {
        if (vm.crashed === true) throw new Error(`vm ${vm.name} has crashed already: \`ioasidctl vm destroy --name ${vm.name}\` removes it`);
        process.kill(vm.agentPid, "SIGKILL");
        out(`vm ${vm.name}: VMM pid ${vm.agentPid} killed; VFIO frees every IOASID of set ${vm.setId}; \`vm destroy --name ${vm.name}\` removes the KVM VM`);
        // Kept, marked: the KVM VM outlives its VMM, and `vm list`/`vm destroy` must still find it.
        writeVms(
          dir,
          readVms(dir).map((x) => (x.name === vm.name ? { ...x, crashed: true } : x)),
        );
        return 0;
      }
      if (verb === "destroy") {
        try {
          if (vm.crashed !== true) process.kill(vm.agentPid, "SIGTERM");
        } catch {
          // already gone
        }
        await withStack(dir, (c) => c.kvm.destroyVm({ vmId: vm.vmId }).catch(() => undefined));
        writeVms(
          dir,
          readVms(dir).filter((x) => x.name !== vm.name),
        );
        out(`vm ${vm.name} destroyed`);
        return 0;
      }
      return verb satisfies never;
    },
  },
  pasid: {
    summary: "guest virtual command: `pasid alloc|free --vm NAME [--pasid HPASID]`",
    usage: "ioasidctl pasid alloc --vm NAME\nioasidctl pasid free --vm NAME --pasid HPASID [--generation G]",
    options: { ...dirOption, vm: { type: "string" }, pasid: { type: "string" }, generation: { type: "string", default: "0" } },
    run: async (v, pos) => {
      const dir = v["dir"] as string;
      const verb = parseVerb(pos, ["alloc", "free"], "pasid");
      const free = verb === "free" ? { hpasid: parseCount(v["pasid"], "pasid"), generation: parseCount(v["generation"], "generation") } : undefined;
      const vm = findVm(dir, v["vm"] as string | undefined);
      return withStack(dir, async (c) => {
        if (free === undefined) out(json(vfio.AllocPasidResponse.toJSON(await c.vfio.allocPasid({ containerId: vm.containerId }))));
        else out(json(vfio.FreePasidResponse.toJSON(await c.vfio.freePasid({ containerId: vm.containerId, ...free }))));
        return 0;
      });
    },
  },
  bind: {
    summary: "bind a guest PASID: `bind --vm NAME --pasid HPASID --gpasid G --mdev UUID|--device DEV`",
    usage:
      "ioasidctl bind --vm NAME --pasid HPASID --gpasid GPASID (--mdev UUID | --device DEVICE_ID) [--generation G]   (the device or mdev must be assigned to the VM)",
    options: {
      ...dirOption,
      vm: { type: "string" },
      pasid: { type: "string" },
      gpasid: { type: "string" },
      device: { type: "string" },
      mdev: { type: "string" },
      generation: { type: "string", default: "0" },
    },
    run: async (v, pos) => bindOrUnbind(v, pos, true),
  },
  unbind: {
    summary: "unbind a guest PASID: `unbind --vm NAME --pasid HPASID --gpasid G --mdev UUID|--device DEV`",
    usage: "ioasidctl unbind --vm NAME --pasid HPASID --gpasid GPASID (--mdev UUID | --device DEVICE_ID) [--generation G]",
    options: {
      ...dirOption,
      vm: { type: "string" },
      pasid: { type: "string" },
      gpasid: { type: "string" },
      device: { type: "string" },
      mdev: { type: "string" },
      generation: { type: "string", default: "0" },
    },
    run: async (v, pos) => bindOrUnbind(v, pos, false),
  },
  mdev: {
    summary: "mediated devices: `mdev create|assign|program|clear`",
    usage:
      "ioasidctl mdev create --device DEV --uuid UUID --wqs 0[,1]   (registers DEV with 2 WQs in VDCM and the IOMMU if needed)\n" +
      "ioasidctl mdev assign --vm NAME --uuid UUID\n" +
      "ioasidctl mdev program --uuid UUID --wq VIRTUAL_WQ --gpasid G   (the guest's MMIO write)\n" +
      "ioasidctl mdev clear --uuid UUID --wq VIRTUAL_WQ",
    options: {
      ...dirOption,
      device: { type: "string" },
      uuid: { type: "string" },
      wqs: { type: "string", default: "0" },
      vm: { type: "string" },
      wq: { type: "string", default: "0" },
      gpasid: { type: "string" },
    },
    run: async (v, pos) => {
      const dir = v["dir"] as string;
      const verb = parseVerb(pos, ["create", "assign", "program", "clear"], "mdev");
      const uuid = requireString(v["uuid"], "uuid");
      const wqIds = (v["wqs"] as string).split(",").map((x) => parseCount(x, "wqs"));
      const virtualWq = parseCount(v["wq"], "wq");
      const gpasid = verb === "program" ? parseCount(v["gpasid"], "gpasid") : 0;
      const vm = verb === "assign" ? findVm(dir, v["vm"] as string | undefined) : undefined;
      return withStack(dir, async (c) => {
        switch (verb) {
          case "create": {
            const device = (v["device"] as string | undefined) ?? "idxd0";
            await c.vdcm
              .registerDevice(
                P(vdcm.RegisterDeviceRequest, {
                  deviceId: device,
                  maxPasidEntries: 64,
                  wqs: [
                    { wqId: 0, mode: vdcm.WqMode.WQ_MODE_DEDICATED, size: 16 },
                    { wqId: 1, mode: vdcm.WqMode.WQ_MODE_SHARED, size: 32 },
                  ],
                }),
              )
              .catch((e: unknown) => {
                if (!isDomainError(e, "DEVICE_EXISTS")) throw e;
              });
            await c.iommu
              .registerDevice(
                P(iommu.RegisterDeviceRequest, {
                  deviceId: device,
                  maxPasids: 1 << 20,
                  priCapable: true,
                  function: iommu.DeviceFunction.DEVICE_FUNCTION_PF,
                  iommuGroup: 1,
                }),
              )
              .catch((e: unknown) => {
                if (!isDomainError(e, "DEVICE_EXISTS")) throw e;
              });
            out(json(vdcm.CreateMdevResponse.toJSON(await c.vdcm.createMdev(P(vdcm.CreateMdevRequest, { parentDeviceId: device, mdevUuid: uuid, wqIds })))));
            return 0;
          }
          case "assign":
            out(
              json(
                vfio.AssignDeviceResponse.toJSON(
                  await c.vfio.assignDevice({ containerId: vm!.containerId, device: { ref: { $case: "mdevUuid", value: uuid } } }),
                ),
              ),
            );
            return 0;
          case "program":
            out(json(vdcm.WriteWqPasidResponse.toJSON(await c.vdcm.writeWqPasid({ mdevUuid: uuid, virtualWq, gpasid }))));
            return 0;
          case "clear":
            out(json(vdcm.ClearWqPasidResponse.toJSON(await c.vdcm.clearWqPasid({ mdevUuid: uuid, virtualWq }))));
            return 0;
        }
      });
    },
  },
  enqcmd: {
    summary: "a vCPU's ENQCMD with a guest PASID: translated through KVM's VMCS table, or #GP",
    usage:
      "ioasidctl enqcmd --vm NAME (--gpasid G | --ia32-pasid RAW) [--vcpu 0] [--json]\n" +
      "  exit 0 when KVM translated the guest PASID, 3 (refused) on #GP; --json: the EnqcmdResponse in the proto3 JSON mapping.",
    options: {
      ...dirOption,
      vm: { type: "string" },
      gpasid: { type: "string" },
      vcpu: { type: "string", default: "0" },
      "ia32-pasid": { type: "string" },
      json: { type: "boolean", default: false },
    },
    run: async (v, pos) => {
      noPositionals(pos, "enqcmd");
      const dir = v["dir"] as string;
      if ((v["ia32-pasid"] === undefined) === (v["gpasid"] === undefined)) throw new UsageError("give exactly one of --gpasid G and --ia32-pasid RAW");
      const raw =
        v["ia32-pasid"] !== undefined
          ? parseCount(v["ia32-pasid"], "ia32-pasid", 0xffff_ffff)
          : (0x8000_0000 | parseCount(v["gpasid"], "gpasid", 0xf_ffff)) >>> 0;
      const vcpu = parseCount(v["vcpu"], "vcpu");
      const vm = findVm(dir, v["vm"] as string | undefined);
      return withStack(dir, async (c) => {
        const r = await c.kvm.enqcmd({ vmId: vm.vmId, vcpu, ia32Pasid: raw });
        const translated = r.outcome === kvm.EnqcmdOutcome.ENQCMD_OUTCOME_TRANSLATED;
        if (v["json"] as boolean) out(json(kvm.EnqcmdResponse.toJSON(r)));
        else
          out(
            `${kvm.enqcmdOutcomeToJSON(r.outcome)}${translated ? ` guest PASID ${r.gpasid} -> host PASID ${r.hpasid}` : ` (${kvm.gpCauseToJSON(r.gpCause)})`}`,
          );
        // #GP: the vCPU's ENQCMD was refused.
        return translated ? ExitCode.OK : ExitCode.REFUSED;
      });
    },
  },
  submit: {
    summary: "submit a descriptor to an mdev's work queue (shared WQs translate its PASID)",
    usage:
      "ioasidctl submit --uuid MDEV --wq VIRTUAL_WQ --pasid PASID [--space guest|host]\n" +
      "  prints the SubmitDescriptorResponse in the proto3 JSON mapping; exit 3 (refused) when the descriptor's DMA faulted.",
    options: {
      ...dirOption,
      uuid: { type: "string" },
      wq: { type: "string", default: "0" },
      pasid: { type: "string" },
      space: { type: "string", default: "host" },
    },
    run: async (v, pos) => {
      noPositionals(pos, "submit");
      if (v["space"] !== "guest" && v["space"] !== "host") throw new UsageError(`--space must be guest or host, got ${String(v["space"])}`);
      const request = P(vdcm.SubmitDescriptorRequest, {
        mdevUuid: requireString(v["uuid"], "uuid"),
        virtualWq: parseCount(v["wq"], "wq"),
        pasid: parseCount(v["pasid"], "pasid"),
        pasidSpace: v["space"] === "guest" ? vdcm.PasidSpace.PASID_SPACE_GUEST : vdcm.PasidSpace.PASID_SPACE_HOST,
        descriptor: { op: vdcm.DescriptorOp.DESCRIPTOR_OP_NOOP, srcAddress: 0n, dstAddress: 0n, size: 0n },
      });
      return withStack(v["dir"] as string, async (c) => {
        const r = await c.vdcm.submitDescriptor(request);
        out(json(vdcm.SubmitDescriptorResponse.toJSON(r)));
        return r.status === vdcm.CompletionStatus.COMPLETION_STATUS_DMA_FAULT ? ExitCode.REFUSED : ExitCode.OK;
      });
    },
  },
  ...attachCommands(out),
  ...holderCommands(out),
  ...faultCommands({ withStack, findVm, out, err: (line) => process.stderr.write(`${line}\n`) }),
  ...deviceCommands({ withStack, findVm, out, err: (line) => process.stderr.write(`${line}\n`) }),
  ...viommuCommands({ withStack, findVm, out, err: (line) => process.stderr.write(`${line}\n`) }),
  conform: conformCommand({ out, err: (line) => process.stderr.write(`${line}\n`) }),
  chaos: chaosCommand({
    out,
    err: (line) => process.stderr.write(`${line}\n`),
    write: (text) => process.stderr.write(text),
    vmmCommand: [process.execPath, process.argv[1]!, "vmm-agent"],
    ttyColumns: process.stderr.isTTY ? process.stderr.columns : undefined,
  }),
};

async function bindOrUnbind(v: Record<string, string | boolean | undefined>, pos: string[], bind: boolean): Promise<number> {
  noPositionals(pos, bind ? "bind" : "unbind");
  if (v["mdev"] !== undefined && v["device"] !== undefined) throw new UsageError("give one of --mdev UUID and --device DEVICE_ID, not both");
  const dir = v["dir"] as string;
  const req = {
    device:
      v["mdev"] !== undefined
        ? { ref: { $case: "mdevUuid" as const, value: v["mdev"] as string } }
        : { ref: { $case: "deviceId" as const, value: (v["device"] as string | undefined) ?? "idxd0" } },
    hpasid: parseCount(v["pasid"], "pasid"),
    generation: parseCount(v["generation"], "generation"),
    gpasid: parseCount(v["gpasid"], "gpasid"),
  };
  const vm = findVm(dir, v["vm"] as string | undefined);
  return withStack(dir, async (c) => {
    out(
      json(
        bind
          ? vfio.BindGuestPasidResponse.toJSON(await c.vfio.bindGuestPasid(P(vfio.BindGuestPasidRequest, { ...req, containerId: vm.containerId })))
          : vfio.UnbindGuestPasidResponse.toJSON(await c.vfio.unbindGuestPasid(P(vfio.UnbindGuestPasidRequest, { ...req, containerId: vm.containerId }))),
      ),
    );
    return 0;
  });
}

function help(): string {
  const width = Math.max(...Object.keys(commands).map((k) => k.length));
  return [
    "ioasidctl — drive and watch an ioasid-fabric stack (the IOASID life cycle of Intel SIOV as services)",
    "",
    "usage: ioasidctl <command> [options]   (ioasidctl <command> --help for its options)",
    "",
    ...Object.entries(commands).map(([k, c]) => `  ${k.padEnd(width)}  ${c.summary}`),
    "",
    "IO page faults: `guest-ram` maps a VM's RAM, `faults watch --respond success` plays the guest, `dma --wait` the",
    "device (page request -> response -> retry); `fault respond` answers one group by hand.",
    "",
    "State (addresses, PIDs, VMs) is kept in --dir (default .ioasid); logs in <dir>/logs.",
    "--json (inspect, status, enqcmd, dma, faults watch; pasid, bind, unbind, mdev and submit always print JSON): the",
    "proto3 JSON mapping of the responses: enum names, 64-bit integers as decimal strings, bytes as base64.",
    "Pictures: `timeline --html` (deliveries and acks per tier, a state band per IOASID), `inspect --html` / `--mermaid`",
    "(sets -> IOASIDs -> holders -> hardware entries); both pages are self-contained.",
    "",
    EXIT_CODES_HELP,
    "",
    "ioasidctl --version prints the version.",
  ].join("\n");
}

/** A command's `--help`: its summary, its usage, and where the exit codes are. */
function commandHelp(cmd: Command): string {
  return `${cmd.summary}\n\nusage:\n${indent(cmd.usage)}\n\nexit codes: 0 done, 1 failed, 2 usage error, 3 refused by the modelled hardware (ioasidctl --help)`;
}
const indent = (text: string) =>
  text
    .split("\n")
    .map((l) => `  ${l}`)
    .join("\n");

/** A usage error: the problem and the command's usage on stderr, exit 2 (clig.dev). */
function usageError(name: string, cmd: Command, message: string): number {
  process.stderr.write(`ioasidctl ${name}: ${message}\nusage:\n${indent(cmd.usage)}\n`);
  return ExitCode.USAGE;
}

async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === "--help" || name === "-h" || name === "help") {
    out(help());
    return ExitCode.OK;
  }
  if (name === undefined) {
    process.stderr.write(`${help()}\n`);
    return ExitCode.USAGE;
  }
  if (name === "--version" || name === "-V") {
    // Nothing else: no state read, no connection (a script asks this of a machine with no stack).
    out(`ioasidctl ${packageVersion(import.meta.url)}`);
    return ExitCode.OK;
  }
  if (name === "vmm-agent") {
    const { values } = parseArgs({
      args: rest,
      options: { vfio: { type: "string" }, token: { type: "string" }, quota: { type: "string" }, name: { type: "string" } },
    });
    await runVmmAgent({ vfioAddress: values.vfio!, mmToken: BigInt(values.token!), quota: Number(values.quota), vmName: values.name! });
    return 0;
  }
  const cmd = commands[name];
  if (cmd === undefined) {
    process.stderr.write(`ioasidctl: unknown command "${name}"\n\n${help()}\n`);
    return ExitCode.USAGE;
  }
  if (rest.includes("--help") || rest.includes("-h")) {
    out(commandHelp(cmd));
    return ExitCode.OK;
  }
  let parsed: { values: Record<string, string | boolean | undefined>; positionals: string[] };
  try {
    parsed = parseArgs({ args: rest, options: cmd.options, allowPositionals: true }) as typeof parsed;
  } catch (err) {
    return usageError(name, cmd, (err as Error).message);
  }
  try {
    return await cmd.run(parsed.values, parsed.positionals);
  } catch (err) {
    // Every command's flags are checked before anything is sent, by throwing UsageError: one
    // place turns it into exit 2 with the usage, so no command can exit 1 on a bad flag.
    if (err instanceof UsageError) return usageError(name, cmd, err.message);
    throw err;
  }
}

/** Exits once stdout and stderr are flushed (a pipe would otherwise lose the end of the output). */
function exitAfterFlush(code: number): void {
  process.stdout.write("", () => process.stderr.write("", () => process.exit(code)));
}

main(process.argv.slice(2)).then(exitAfterFlush, (err: unknown) => {
  const e = err as { reason?: string; message?: string };
  process.stderr.write(`ioasidctl: ${isDomainError(err) ? `${e.reason}: ${e.message}` : (e.message ?? String(err))}\n`);
  exitAfterFlush(ExitCode.FAILED);
});

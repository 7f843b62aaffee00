import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import type { ParseArgsConfig } from "node:util";
import { connect } from "@nats-io/transport-node";
import { checkHealth } from "@ioasid/grpc-kit";
import { natsServers, operatorAuth } from "./clients.js";
import { noPositionals, parseCount } from "./usage-error.js";
import { runningProcesses } from "./stack-state.js";
import { SERVICES, stateFile, type ServiceName, type StackState } from "./stack.js";

/** The ports of a stack docker-compose.yml publishes, by service: variable and default. */
export const COMPOSE_PORTS = {
  nats: { variable: "IOASID_PORT_NATS", port: 4222 },
  "ioasid-core": { variable: "IOASID_PORT_CORE", port: 50051 },
  iommu: { variable: "IOASID_PORT_IOMMU", port: 50052 },
  vfio: { variable: "IOASID_PORT_VFIO", port: 50053 },
  kvm: { variable: "IOASID_PORT_KVM", port: 50054 },
  vdcm: { variable: "IOASID_PORT_VDCM", port: 50055 },
} as const;

/** Where a stack started elsewhere is: NATS and the five services. */
export interface AttachTarget {
  readonly natsUrl: string;
  readonly addresses: Record<ServiceName, string>;
  /**
   * The operator's credentials directory of a stack with authorization (compose's init step writes
   * it to `.ioasid-compose/credentials/operator.operator`): NATS user and certificate.
   */
  readonly credentials?: string;
}

/** Where the compose stack's credentials are on the host (docker-compose.yml bind-mounts it). */
export function composeCredentials(env: NodeJS.ProcessEnv = process.env): string {
  return resolve(env["IOASID_COMPOSE_CREDENTIALS"] ?? ".ioasid-compose/credentials");
}

/** Options of {@link attachStack}. */
export interface AttachOptions {
  /** Directory of the state file the other commands read. @default ".ioasid" */
  readonly dir?: string;
  /** How long to wait for NATS and every service to answer, in ms. @default 30000 */
  readonly timeoutMs?: number;
  /** Progress lines. */
  readonly log?: (line: string) => void;
}

/**
 * The compose stack's addresses on 127.0.0.1: each port from its IOASID_PORT_* variable in `env`
 * (the variables docker-compose.yml and the host-network file read), else its default.
 */
export function composeTarget(env: NodeJS.ProcessEnv = process.env): AttachTarget {
  const port = (s: keyof typeof COMPOSE_PORTS): number => {
    const raw = env[COMPOSE_PORTS[s].variable];
    if (raw === undefined || raw === "") return COMPOSE_PORTS[s].port;
    const n = Number(raw);
    if (!Number.isInteger(n) || n < 1 || n > 65535) throw new Error(`${COMPOSE_PORTS[s].variable}=${raw} is not a port`);
    return n;
  };
  const addresses = Object.fromEntries(SERVICES.map((s) => [s.name, `127.0.0.1:${port(s.name)}`])) as Record<ServiceName, string>;
  return { natsUrl: `nats://127.0.0.1:${port("nats")}`, addresses };
}

/**
 * Points ioasidctl at a stack it did not start (docker compose, or services started by hand):
 * waits until NATS accepts a connection and every service's health check answers SERVING, then
 * writes `<dir>/stack.json` with the addresses and no PIDs, so every other command uses that
 * stack. `ioasidctl down` then only forgets it (and stops the VMM processes of `vm create`).
 * @throws Error naming what did not answer in time, or when a stack started by `ioasidctl up` is
 *   running from `dir`
 */
export async function attachStack(target: AttachTarget, options: AttachOptions = {}): Promise<StackState> {
  const dir = resolve(options.dir ?? ".ioasid");
  const timeoutMs = options.timeoutMs ?? 30_000;
  const log = options.log ?? (() => undefined);
  if (existsSync(stateFile(dir))) {
    const old = JSON.parse(readFileSync(stateFile(dir), "utf8")) as StackState;
    // Any process it names: services, a standby core, the supervisor, every nats-server of a cluster.
    if (runningProcesses(old).length > 0) {
      throw new Error(`a stack started by \`ioasidctl up\` is running from ${dir}: \`ioasidctl down\` first, or attach with another --dir`);
    }
  }
  const auth = target.credentials === undefined ? {} : operatorAuth(target.credentials);
  const health = auth.tls === undefined ? {} : { client: { tls: auth.tls } };
  const deadline = Date.now() + timeoutMs;
  const pending = new Map<string, string>([["nats", "not tried yet"], ...SERVICES.map((s) => [s.name, "not tried yet"] as [string, string])]);
  for (;;) {
    if (pending.has("nats")) {
      try {
        const nc = await connect({ servers: natsServers(target.natsUrl), name: "ioasidctl-attach", timeout: 1000, reconnect: false, ...auth.natsAuth });
        await nc.close();
        pending.delete("nats");
        log(`nats             ${target.natsUrl}  connected`);
      } catch (err) {
        pending.set("nats", (err as Error).message);
      }
    }
    for (const s of SERVICES) {
      if (!pending.has(s.name)) continue;
      const address = target.addresses[s.name];
      const status = await checkHealth(address, "", { deadlineMs: 1000, ...health }).catch((err: unknown) => (err as Error).message);
      if (status === "SERVING") {
        pending.delete(s.name);
        log(`${s.name.padEnd(16)} ${address}  SERVING`);
      } else pending.set(s.name, status);
    }
    if (pending.size === 0) break;
    if (Date.now() >= deadline) {
      const what = [...pending].map(([name, why]) => `  ${name} (${name === "nats" ? target.natsUrl : target.addresses[name as ServiceName]}): ${why}`);
      throw new Error(
        `after ${timeoutMs} ms these did not answer:\n${what.join("\n")}\n` +
          "is the stack up and healthy? (`docker compose ps`, `docker compose logs SERVICE`); are the addresses right?",
      );
    }
    await new Promise((r) => setTimeout(r, 250));
  }
  const services = Object.fromEntries(SERVICES.map((s) => [s.name, { pid: undefined, address: target.addresses[s.name], log: "" }])) as StackState["services"];
  const url = new URL(target.natsUrl.split(",")[0] ?? target.natsUrl);
  const state: StackState = {
    dir,
    natsUrl: target.natsUrl,
    nats: { pid: undefined, port: Number(url.port === "" ? 4222 : url.port), storeDir: "", external: true },
    services,
    startedAt: Date.now(),
    ...(target.credentials === undefined ? {} : { operatorCredentials: resolve(target.credentials) }),
    ...(target.credentials !== undefined && existsSync(join(target.credentials, "..", "vmm.vmm"))
      ? { vmmCredentials: resolve(target.credentials, "..", "vmm.vmm") }
      : {}),
  };
  mkdirSync(dir, { recursive: true });
  writeFileSync(stateFile(dir), JSON.stringify(state, null, 2));
  return state;
}

/** A command of ioasidctl (the shape main.ts registers). */
interface AttachCommand {
  readonly summary: string;
  readonly usage: string;
  readonly options: NonNullable<ParseArgsConfig["options"]>;
  readonly run: (values: Record<string, string | boolean | undefined>, positionals: string[]) => Promise<number>;
}

/** `ioasidctl attach`, for main.ts's command table. */
export function attachCommands(out: (line: string) => void): Record<"attach", AttachCommand> {
  return {
    attach: {
      summary: "use a stack started elsewhere (docker compose): wait for its health, then every command uses it",
      usage:
        "ioasidctl attach [--dir .ioasid] [--nats URL] [--core ADDR] [--iommu ADDR] [--vfio ADDR] [--kvm ADDR] [--vdcm ADDR] [--timeout-ms 30000]\n" +
        "  defaults: the ports docker-compose.yml publishes on 127.0.0.1 (nats 4222, core 50051, iommu 50052, vfio 50053,\n" +
        "  kvm 50054, vdcm 50055), each taken from its IOASID_PORT_NATS/CORE/IOMMU/VFIO/KVM/VDCM variable when set.\n" +
        "  `ioasidctl down` afterwards only forgets the stack (and stops the VMM processes of `vm create`).\n" +
        "  --credentials DIR: the operator's credentials (default: <IOASID_COMPOSE_CREDENTIALS or .ioasid-compose/credentials>/operator.operator\n" +
        "  when it exists, as compose's init step writes it); without, ioasidctl connects unauthenticated.",
      options: {
        dir: { type: "string", default: ".ioasid" },
        nats: { type: "string" },
        core: { type: "string" },
        iommu: { type: "string" },
        vfio: { type: "string" },
        kvm: { type: "string" },
        vdcm: { type: "string" },
        "timeout-ms": { type: "string", default: "30000" },
        credentials: { type: "string" },
      },
      run: async (v, pos) => {
        const defaults = composeTarget();
        const pick = (flag: string, name: ServiceName): string => (v[flag] as string | undefined) ?? defaults.addresses[name];
        const composeOperator = join(composeCredentials(), "operator.operator");
        const credentials = (v["credentials"] as string | undefined) ?? (existsSync(composeOperator) ? composeOperator : undefined);
        const target: AttachTarget = {
          ...(credentials === undefined ? {} : { credentials }),
          natsUrl: (v["nats"] as string | undefined) ?? defaults.natsUrl,
          addresses: {
            "ioasid-core": pick("core", "ioasid-core"),
            iommu: pick("iommu", "iommu"),
            vfio: pick("vfio", "vfio"),
            kvm: pick("kvm", "kvm"),
            vdcm: pick("vdcm", "vdcm"),
          },
        };
        noPositionals(pos, "attach");
        const timeoutMs = parseCount(v["timeout-ms"], "timeout-ms");
        const state = await attachStack(target, { dir: v["dir"] as string, timeoutMs, log: out });
        out(`attached (state in ${stateFile(state.dir)}); every command with --dir ${v["dir"] as string} now uses this stack`);
        return 0;
      },
    },
  };
}

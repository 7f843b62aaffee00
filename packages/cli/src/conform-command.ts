import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import type { ParseArgsConfig } from "node:util";
import { CONFORM_ROLES, formatResult, NEEDS, runConformance, SUITES, type ConformOptions, type ConformReport, type ConformRole } from "@ioasid/conform";

type Values = Record<string, string | boolean | undefined>;

/** A bad flag or a bad combination: exit 2 with the usage. */
export class ConformUsageError extends Error {
  override readonly name = "ConformUsageError";
}

/** `host:port` with a port in 1..65535 (the kit must know where the target listens: no port 0). */
function parseTarget(value: string, flag: string): string {
  const m = /^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d+)$/.exec(value);
  const port = m === null ? NaN : Number(m[2]);
  if (m === null || !Number.isInteger(port) || port < 1 || port > 65535)
    throw new ConformUsageError(`${flag} must be HOST:PORT with a port in 1..65535, got "${value}"`);
  return value;
}

/**
 * Parses the flags of `ioasidctl conform` into the kit's options.
 * @throws ConformUsageError on a missing or bad flag, or a bad combination
 */
export function parseConformOptions(v: Values): Omit<ConformOptions, "log" | "onResult"> & { readonly json: boolean; readonly list: boolean } {
  const role = v["role"];
  if (typeof role !== "string") throw new ConformUsageError(`--role is required: one of ${CONFORM_ROLES.join(", ")}`);
  if (!(CONFORM_ROLES as readonly string[]).includes(role)) throw new ConformUsageError(`--role must be one of ${CONFORM_ROLES.join(", ")}, got "${role}"`);
  if (SUITES[role as ConformRole] === undefined) throw new ConformUsageError(`no suite for --role ${role} yet (suites: ${Object.keys(SUITES).join(", ")})`);
  if (v["list"] === true) return { role: role as ConformRole, target: "-", json: v["json"] === true, list: true };
  if (typeof v["target"] !== "string")
    throw new ConformUsageError("--target HOST:PORT is required: where the implementation under test serves (or will serve, with --target-cmd)");
  const target = parseTarget(v["target"], "--target");
  const stack = v["stack"] as string | undefined;
  const nats = v["nats"] as string | undefined;
  const coreAddress = v["core"] as string | undefined;
  const targetCmd = v["target-cmd"] as string | undefined;
  if (stack !== undefined && (nats !== undefined || coreAddress !== undefined))
    throw new ConformUsageError("--stack takes NATS and the core from the stack: give --stack, or --nats/--core, not both");
  if (stack !== undefined) {
    // A stack with mTLS (ioasidctl up without --insecure): the core authorizes each call by the
    // caller's role, and the kit plays several roles around the target, which no one certificate may.
    const file = join(stack, "stack.json");
    const operator = existsSync(file) ? (JSON.parse(readFileSync(file, "utf8")) as { operatorCredentials?: string }).operatorCredentials : undefined;
    if (operator !== undefined && existsSync(join(operator, "cert.pem")))
      throw new ConformUsageError(
        `the stack in ${stack} has mTLS: the core authorizes each call by the caller's role, and the kit plays several roles around the target; ` +
          "verify a role inside a stack started with `ioasidctl up --insecure`, or let the kit bring up its own stack (--target-cmd)",
      );
  }
  if (coreAddress !== undefined) parseTarget(coreAddress, "--core");
  if (nats !== undefined && !/^(nats|tls|wss?):\/\/[^\s]+$/.test(nats))
    throw new ConformUsageError(`--nats must be a NATS URL (nats://host:port), got "${nats}"`);
  if (role === "core" && coreAddress !== undefined)
    throw new ConformUsageError("--core names the core around a role; with --role core the core is the --target");
  if (targetCmd === undefined && stack === undefined && nats === undefined) {
    throw new ConformUsageError(
      "the kit needs to reach what the target uses: give --target-cmd CMD (the kit starts the target against a stack of its own), --stack DIR (an `ioasidctl up` stack the target is part of), or --nats URL [--core HOST:PORT] (the NATS and core the running target was pointed at)",
    );
  }
  // A running target knows where its neighbours are; the kit can only be told where the core is.
  const around = NEEDS[role as ConformRole].filter((n) => n !== "core");
  if (targetCmd === undefined && stack === undefined && around.length > 0) {
    throw new ConformUsageError(
      `a running ${role} was pointed at its ${around.join(", ")} too: give --stack DIR (the stack it is part of) or --target-cmd CMD`,
    );
  }
  if (targetCmd === undefined && stack === undefined && role !== "core" && coreAddress === undefined) {
    throw new ConformUsageError(`--nats needs --core HOST:PORT with --role ${role}: the core the running target was pointed at`);
  }
  const only =
    typeof v["only"] === "string"
      ? v["only"]
          .split(",")
          .map((s) => s.trim())
          .filter((s) => s.length > 0)
      : undefined;
  const junit = v["junit"] as string | undefined;
  return {
    role: role as ConformRole,
    target,
    json: v["json"] === true,
    list: false,
    ...(targetCmd === undefined ? {} : { targetCmd }),
    ...(stack === undefined ? {} : { stackDir: stack }),
    ...(nats === undefined ? {} : { natsUrl: nats }),
    ...(coreAddress === undefined ? {} : { coreAddress }),
    ...(only === undefined ? {} : { only }),
    ...(junit === undefined ? {} : { junitFile: junit }),
  };
}

const USAGE = [
  "conform --role kvm|vdcm|iommu|vfio|core --list [--json]",
  "conform --role kvm|vdcm|iommu|vfio|core --target HOST:PORT",
  "        [--target-cmd CMD | --stack DIR | --nats URL [--core HOST:PORT]] [--junit FILE] [--only ID,...] [--json]",
  "",
  "  --target HOST:PORT  where the implementation under test serves its role's gRPC service and grpc.health.v1",
  "  --target-cmd CMD    a shell command that starts the target; the kit brings up nats-server and our services",
  "                      on ephemeral ports, runs CMD with their addresses in its environment (NATS_URL,",
  "                      IOASID_CORE_ADDRESS, IOMMU_ADDRESS, VDCM_ADDRESS, KVM_ADDRESS, IOASID_BUS_PREFIX,",
  "                      IOASID_CONFORM_TARGET, and our services' own <ROLE>_GRPC_ADDRESS), and restarts it for the",
  "                      restart clauses (skipped without it)",
  "  --stack DIR         the target is part of a stack started by `ioasidctl up --insecure --dir DIR` (a stack with mTLS is refused: the kit plays several roles)",
  "  --nats URL          the NATS (with JetStream) the running target uses",
  "  --core HOST:PORT    the core (SERVING) the running target was pointed at (kvm, iommu; vdcm and vfio need --stack)",
  "  --junit FILE        also write JUnit XML",
  "  --only ID,...       only clauses whose id starts with one of these (kvm.free, kvm.rpc.enqcmd)",
  "  --json              print the report as JSON instead of lines",
  "  --list              print the role's clauses (id, statement, where the rule comes from) and exit",
  "",
  "Exit: 0 when no clause failed (skipped clauses say why), 1 when one did or the stack could not be brought up,",
  '2 on bad flags. Clauses and what they mean: README, "Verify your own role implementation".',
].join("\n");

/** `ioasidctl conform`: the conformance kit against an implementation at its address (DESIGN §12). */
export function conformCommand(io: { out: (line: string) => void; err: (line: string) => void }) {
  return {
    summary: "verify a role implementation (ours or yours) at its address, clause by clause (JUnit with --junit)",
    usage: USAGE,
    options: {
      role: { type: "string" },
      target: { type: "string" },
      "target-cmd": { type: "string" },
      stack: { type: "string" },
      nats: { type: "string" },
      core: { type: "string" },
      junit: { type: "string" },
      only: { type: "string" },
      json: { type: "boolean" },
      list: { type: "boolean" },
    } satisfies NonNullable<ParseArgsConfig["options"]>,
    run: async (v: Values, positionals: string[]): Promise<number> => {
      let options: ReturnType<typeof parseConformOptions>;
      try {
        if (positionals.length > 0) throw new ConformUsageError(`unexpected argument "${positionals[0]}"`);
        options = parseConformOptions(v);
      } catch (err) {
        if (!(err instanceof ConformUsageError)) throw err;
        io.err(`ioasidctl conform: ${err.message}\nusage:\n  ${USAGE.split("\n").join("\n  ")}`);
        return 2;
      }
      const { json, list, ...kit } = options;
      if (list) {
        const suite = SUITES[kit.role]!;
        if (json)
          io.out(
            JSON.stringify(
              suite.clauses.map((c) => ({ id: c.id, statement: c.statement, source: c.source, needs: c.needs ?? [] })),
              null,
              2,
            ),
          );
        else
          for (const c of suite.clauses)
            io.out(`${c.id}\n    ${c.statement}\n    (${c.source}${c.needs === undefined ? "" : `; needs ${c.needs.join(", ")}`})`);
        return 0;
      }
      const suite = SUITES[kit.role]!;
      if (!json) io.out(`conformance of ${kit.role} at ${kit.target}: ${suite.clauses.length} clauses (${suite.summary})`);
      let report: ConformReport;
      // Interrupted, the kit exits: what it started goes with it (by PID, on the process's exit).
      const interrupted = (signal: NodeJS.Signals) => {
        io.err(`ioasidctl conform: ${signal}: stopping the target and the stack the kit started`);
        process.exit(signal === "SIGINT" ? 130 : 143);
      };
      process.once("SIGINT", interrupted);
      process.once("SIGTERM", interrupted);
      try {
        report = await runConformance({
          ...kit,
          log: (line) => (json ? undefined : io.out(`  ${line}`)),
          onResult: (r) => (json ? undefined : io.out(formatResult(r))),
        });
      } catch (err) {
        io.err(`ioasidctl conform: could not run the suite: ${(err as Error).message}`);
        return 1;
      }
      if (json) io.out(JSON.stringify(report, null, 2));
      else {
        const s = report.summary;
        io.out(
          `\n${kit.role} at ${kit.target}: ${s.passed} passed, ${s.failed} failed, ${s.skipped} skipped of ${s.total} clauses in ${(report.ms / 1000).toFixed(1)} s`,
        );
        if (kit.junitFile !== undefined) io.out(`JUnit XML: ${kit.junitFile}`);
      }
      return report.ok ? 0 : 1;
    },
  };
}

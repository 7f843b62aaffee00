import { readFileSync } from "node:fs";

/** Kinds of configuration variable {@link loadConfig} understands, as a closed set. */
export const ConfigKind = {
  string: "string",
  int: "int",
  port: "port",
  portOrOff: "port-or-off",
  address: "address",
  url: "url",
  enum: "enum",
  durationMs: "duration-ms",
  bytes: "bytes",
  boolean: "boolean",
} as const;
export type ConfigKind = (typeof ConfigKind)[keyof typeof ConfigKind];

interface VarBase {
  /** Environment variable name, e.g. `IOASID_CORE_GRPC_ADDRESS`. */
  readonly name: string;
  /** One sentence for `--help`: what the variable sets, in the service's words. */
  readonly doc: string;
  /** Without a default, an unset variable is an error, unless `optional` (the value is then undefined). */
  readonly optional?: boolean;
}

/** Any text. */
export interface StringVar extends VarBase {
  readonly kind: "string";
  readonly default?: string;
}
/** An integer, optionally bounded (inclusive). */
export interface IntVar extends VarBase {
  readonly kind: "int";
  readonly min?: number;
  readonly max?: number;
  readonly default?: number;
}
/** A TCP port 0..65535 (0 = ephemeral). */
export interface PortVar extends VarBase {
  readonly kind: "port";
  readonly default?: number;
}
/** A TCP port 0..65535 (0 = ephemeral), or `off`: the listener is not started (a metrics port). */
export interface PortOrOffVar extends VarBase {
  readonly kind: "port-or-off";
  readonly default?: number | "off";
}
/** `host:port` (IPv6 literals in brackets); the value is a {@link HostPort}. */
export interface AddressVar extends VarBase {
  readonly kind: "address";
  /** In `host:port` form. */
  readonly default?: string;
  /**
   * Accept a comma-separated list of host:port (a core and its standbys): the value's `host`/`port`
   * are the first's, its `address` the gRPC target of them all (`ipv4:h1:p1,h2:p2`: the channel
   * picks the first that answers and moves on when it fails).
   */
  readonly list?: boolean;
}
/** An absolute URL, optionally restricted to some schemes (`["nats:", "tls:"]`). */
export interface UrlVar extends VarBase {
  readonly kind: "url";
  readonly protocols?: readonly string[];
  /** Accept a comma-separated list of such URLs (the servers of a NATS cluster); the value stays the text. */
  readonly list?: boolean;
  readonly default?: string;
}
/** One of a fixed set of words. */
export interface EnumVar<V extends string = string> extends VarBase {
  readonly kind: "enum";
  readonly values: readonly V[];
  readonly default?: V;
}
/**
 * A duration, in milliseconds, written with its unit: `250ms`, `5s`, `1.5m`, `1h`; `0` alone (no
 * unit needed). A bare number is refused: `IOASID_DELIVERY_DEADLINE=5` read as 5 ms surprised
 * everyone who meant 5 s, and ioasidctl's flags refuse it too (issue 17).
 */
export interface DurationVar extends VarBase {
  readonly kind: "duration-ms";
  /** In milliseconds. */
  readonly default?: number;
}
/**
 * A size or an address in bytes, as a bigint (64-bit host addresses must not lose precision):
 * decimal or `0x` hex, optionally with a binary unit `K`, `M`, `G`, `T` (also `KiB`…; powers of
 * 1024), e.g. `4096`, `64G`, `0x1_0000_0000`; `_` separates digits.
 */
export interface BytesVar extends VarBase {
  readonly kind: "bytes";
  readonly default?: bigint;
  /** Largest value accepted (inclusive). @default 2^64 - 1 */
  readonly max?: bigint;
}
/** true/false (also 1/0, yes/no, on/off). */
export interface BooleanVar extends VarBase {
  readonly kind: "boolean";
  readonly default?: boolean;
}

/** The declaration of one environment variable. */
export type ConfigVar = StringVar | IntVar | PortVar | PortOrOffVar | AddressVar | UrlVar | EnumVar | DurationVar | BytesVar | BooleanVar;

/** A service's configuration: property name → the variable that sets it. */
export type ConfigSchema = { readonly [key: string]: ConfigVar };

/** A parsed `host:port`. */
export interface HostPort {
  /** Host name or IP literal (IPv6 without brackets). */
  readonly host: string;
  /** 0..65535. */
  readonly port: number;
  /** `host:port` again, brackets restored for IPv6: what clients and `listen` take. */
  readonly address: string;
}

type BaseValueOf<V> = V extends { kind: "int" | "port" | "duration-ms" }
  ? number
  : V extends { kind: "port-or-off" }
    ? number | "off"
    : V extends { kind: "bytes" }
      ? bigint
      : V extends { kind: "boolean" }
        ? boolean
        : V extends { kind: "address" }
          ? HostPort
          : V extends { kind: "enum"; values: readonly (infer E)[] }
            ? E
            : string;

/** The value type of one variable: undefined only when it is optional and has no default. */
export type ConfigValue<V> = V extends { default: unknown } ? BaseValueOf<V> : V extends { optional: true } ? BaseValueOf<V> | undefined : BaseValueOf<V>;

/** The typed configuration a schema describes. */
export type Config<S extends ConfigSchema> = { readonly [K in keyof S]: ConfigValue<S[K]> };

/** One bad variable: its name, its raw value (undefined if unset) and what was expected. */
export interface ConfigProblem {
  readonly name: string;
  readonly value: string | undefined;
  readonly expected: string;
}

/**
 * The configuration of a service is invalid: lists every bad variable at once (not just the first),
 * each as `NAME="value": expected …`.
 */
export class ConfigError extends Error {
  override readonly name = "ConfigError";
  /** Every problem found. */
  readonly problems: readonly ConfigProblem[];

  constructor(problems: readonly ConfigProblem[]) {
    const lines = problems.map((p) =>
      p.value === undefined ? `${p.name} is not set: expected ${p.expected}` : `${p.name}=${JSON.stringify(p.value)}: expected ${p.expected}`,
    );
    super(`invalid configuration (${problems.length} ${problems.length === 1 ? "problem" : "problems"}):\n  ${lines.join("\n  ")}`);
    this.problems = problems;
  }
}

/**
 * Identity function that keeps a schema's literal types (enum values), so that
 * {@link loadConfig} can type the result: `const schema = defineConfigSchema({...})`.
 */
export function defineConfigSchema<const S extends ConfigSchema>(schema: S): S {
  return schema;
}

/**
 * Reads and validates a service's configuration from the environment. An empty variable counts as
 * unset (the default applies). Collects every problem before failing.
 *
 * @throws ConfigError listing every invalid or missing variable.
 * @example
 * const config = loadConfig(defineConfigSchema({
 *   address: { name: "IOASID_CORE_GRPC_ADDRESS", kind: "address", default: "127.0.0.1:50051",
 *              doc: "Where the core's gRPC server listens." },
 * }));
 * await server.listen(config.address.host, config.address.port);
 */
export function loadConfig<const S extends ConfigSchema>(schema: S, env: NodeJS.ProcessEnv = process.env): Config<S> {
  const problems: ConfigProblem[] = [];
  const result: Record<string, unknown> = {};
  for (const [key, variable] of Object.entries(schema)) {
    const raw = env[variable.name];
    const set = raw !== undefined && raw.trim() !== "";
    if (!set && variable.default === undefined) {
      if (variable.optional === true) result[key] = undefined;
      else problems.push({ name: variable.name, value: undefined, expected: expectation(variable) });
      continue;
    }
    // A duration's default is a number of milliseconds: say so, since a bare number is refused.
    const text = set ? raw : variable.kind === "duration-ms" ? `${String(variable.default)}ms` : String(variable.default);
    const parsed = parse(variable, text.trim());
    if (parsed.ok) result[key] = parsed.value;
    else problems.push({ name: set ? variable.name : `${variable.name} (default)`, value: text, expected: expectation(variable, text.trim()) });
  }
  if (problems.length > 0) throw new ConfigError(problems);
  return result as Config<S>;
}

type Parsed = { readonly ok: true; readonly value: unknown } | { readonly ok: false };
const bad: Parsed = { ok: false };

function parse(variable: ConfigVar, text: string): Parsed {
  switch (variable.kind) {
    case "string":
      return { ok: true, value: text };
    case "int": {
      const n = parseInteger(text);
      if (n === undefined) return bad;
      if (variable.min !== undefined && n < variable.min) return bad;
      if (variable.max !== undefined && n > variable.max) return bad;
      return { ok: true, value: n };
    }
    case "port": {
      const n = parsePort(text);
      return n === undefined ? bad : { ok: true, value: n };
    }
    case "port-or-off": {
      if (text.toLowerCase() === "off") return { ok: true, value: "off" };
      const n = parsePort(text);
      return n === undefined ? bad : { ok: true, value: n };
    }
    case "address": {
      if (variable.list === true && text.includes(",")) {
        const all = text.split(",").map((p) => parseAddress(p.trim()));
        // The gRPC target `ipv4:…` takes IPv4 literals only.
        if (all.some((hp) => hp === undefined || !/^\d{1,3}(\.\d{1,3}){3}$/.test(hp.host))) return bad;
        const first = all[0]!;
        return { ok: true, value: { host: first.host, port: first.port, address: `ipv4:${all.map((hp) => hp!.address).join(",")}` } };
      }
      const hp = parseAddress(text);
      return hp === undefined ? bad : { ok: true, value: hp };
    }
    case "url": {
      const parts = variable.list === true ? text.split(",").map((p) => p.trim()) : [text];
      for (const part of parts) {
        if (!URL.canParse(part)) return bad;
        const url = new URL(part);
        if (variable.protocols !== undefined && !variable.protocols.includes(url.protocol)) return bad;
      }
      return { ok: true, value: parts.join(",") };
    }
    case "enum":
      return variable.values.includes(text) ? { ok: true, value: text } : bad;
    case "duration-ms": {
      const ms = parseDurationMs(text);
      return ms === undefined ? bad : { ok: true, value: ms };
    }
    case "bytes": {
      const n = parseBytes(text);
      return n === undefined || n > (variable.max ?? U64_MAX) ? bad : { ok: true, value: n };
    }
    case "boolean": {
      const lower = text.toLowerCase();
      if (["true", "1", "yes", "on"].includes(lower)) return { ok: true, value: true };
      if (["false", "0", "no", "off"].includes(lower)) return { ok: true, value: false };
      return bad;
    }
  }
}

/** What a variable accepts, in words (the right-hand side of every problem line and of `--help`). */
function expectation(variable: ConfigVar, given?: string): string {
  switch (variable.kind) {
    case "string":
      return "a value";
    case "int":
      if (variable.min !== undefined && variable.max !== undefined) return `an integer ${variable.min}..${variable.max}`;
      if (variable.min !== undefined) return `an integer >= ${variable.min}`;
      if (variable.max !== undefined) return `an integer <= ${variable.max}`;
      return "an integer";
    case "port":
      return "an integer port 0..65535";
    case "port-or-off":
      return "an integer port 0..65535 (0: an ephemeral port), or off";
    case "address":
      return variable.list === true
        ? "host:port with a port 0..65535 (e.g. 127.0.0.1:50051), or a comma-separated list of IPv4 host:port (a core and its standbys)"
        : "host:port with a port 0..65535 (e.g. 127.0.0.1:50051)";
    case "url": {
      const one = variable.protocols === undefined ? "an absolute URL" : `a URL with scheme ${variable.protocols.join(" or ")}`;
      return variable.list === true ? `${one}, or a comma-separated list of them` : one;
    }
    case "enum":
      return `one of ${variable.values.join(", ")}`;
    case "duration-ms":
      if (given !== undefined && /^\d+(\.\d+)?$/.test(given)) return `a duration with its unit: write ${given}ms or ${given}s (a bare number is refused)`;
      return "a duration with its unit, ms, s, m or h (e.g. 250ms, 5s; a bare number is refused: write 5ms or 5s)";
    case "bytes":
      return `bytes: a number (or 0x hex) with an optional K, M, G or T (powers of 1024), e.g. 64G, 0x100000000${variable.max === undefined ? "" : `; at most ${variable.max}`}`;
    case "boolean":
      return "true or false (also 1/0, yes/no, on/off)";
  }
}

function parseInteger(text: string): number | undefined {
  if (!/^[+-]?\d+$/.test(text)) return undefined;
  const n = Number(text);
  return Number.isSafeInteger(n) ? n : undefined;
}

function parsePort(text: string): number | undefined {
  const n = parseInteger(text);
  return n !== undefined && n >= 0 && n <= 65535 ? n : undefined;
}

/** Parses `host:port` (`[v6]:port` for IPv6 literals); undefined when it is not one. */
export function parseAddress(text: string): HostPort | undefined {
  const match = /^(?:\[([^\]\s]+)\]|([^:\s[\]]+)):([^:]+)$/.exec(text);
  if (match === null) return undefined;
  const v6 = match[1];
  const host = v6 ?? match[2];
  const port = parsePort(match[3] ?? "");
  if (host === undefined || port === undefined) return undefined;
  return { host, port, address: v6 === undefined ? `${host}:${port}` : `[${host}]:${port}` };
}

const durationUnits: Readonly<Record<string, number>> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 };

/** Parses a duration with its unit (see {@link DurationVar}) into ms; undefined when it is not one. */
export function parseDurationMs(text: string): number | undefined {
  // 0 is 0 in any unit (Go's time.ParseDuration takes it bare too).
  if (/^0+(\.0+)?$/.test(text)) return 0;
  const match = /^(\d+(?:\.\d+)?)\s*(ms|s|m|h)$/.exec(text);
  if (match === null) return undefined;
  const ms = Number(match[1]) * (durationUnits[match[2]!] ?? Number.NaN);
  return Number.isFinite(ms) ? Math.round(ms) : undefined;
}

const U64_MAX = (1n << 64n) - 1n;
const byteUnits: Readonly<Record<string, bigint>> = { "": 1n, k: 1n << 10n, m: 1n << 20n, g: 1n << 30n, t: 1n << 40n };

/** Parses a size in bytes (see {@link BytesVar}); undefined when it is not one or exceeds 2^64 - 1. */
export function parseBytes(text: string): bigint | undefined {
  const match = /^(0x[0-9a-f_]+|[0-9][0-9_]*)\s*(?:([kmgt])(?:i?b)?|b)?$/i.exec(text);
  if (match === null) return undefined;
  const digits = match[1]!.replace(/_/g, "");
  if (digits === "0x") return undefined;
  const n = BigInt(digits) * (byteUnits[(match[2] ?? "").toLowerCase()] ?? 0n);
  return n > U64_MAX ? undefined : n;
}

/** A byte count as {@link parseBytes} reads it back, in the largest unit that divides it (`64G`, `4096`). */
export function formatBytesValue(n: bigint): string {
  for (const unit of ["t", "g", "m", "k"] as const) {
    const size = byteUnits[unit]!;
    if (n > 0n && n % size === 0n) return `${n / size}${unit.toUpperCase()}`;
  }
  return String(n);
}

/** Milliseconds as {@link parseDurationMs} reads them back, in the largest unit that divides them (`2s`, `250ms`). */
export function formatDurationValue(ms: number): string {
  for (const [unit, size] of [
    ["h", 3_600_000],
    ["m", 60_000],
    ["s", 1000],
  ] as const)
    if (ms > 0 && ms % size === 0) return `${ms / size}${unit}`;
  return `${ms}ms`;
}

/**
 * The `--help` text of a schema: one entry per variable with what it accepts, its default and its doc.
 */
export function describeConfig(schema: ConfigSchema): string {
  const entries = Object.values(schema);
  const width = Math.max(0, ...entries.map((v) => v.name.length));
  return entries
    .map((v) => {
      const shown =
        v.kind === "bytes" && v.default !== undefined
          ? formatBytesValue(v.default)
          : v.kind === "duration-ms" && v.default !== undefined
            ? formatDurationValue(v.default)
            : String(v.default);
      const dflt = v.default !== undefined ? `default ${shown}` : v.optional === true ? "optional" : "required";
      return `  ${v.name.padEnd(width)}  ${v.doc}\n  ${" ".repeat(width)}  ${expectation(v)}; ${dflt}`;
    })
    .join("\n");
}

/** Options of {@link configOrExit}. */
export interface ConfigOrExitOptions {
  /** Service name, first word of every message. */
  readonly service: string;
  /** @default process.env */
  readonly env?: NodeJS.ProcessEnv;
  /**
   * The service's version (its package.json's), printed by `--version`. Read it with
   * {@link packageVersion}. @default "unknown"
   */
  readonly version?: string;
  /**
   * Command-line arguments: `--help`/`-h` prints {@link describeConfig} and exits 0, `--version`
   * prints the service and its version and exits 0; anything else is refused with exit 2 (a service
   * is configured by its environment only). @default process.argv.slice(2)
   */
  readonly argv?: readonly string[];
  /** @default process.exit */
  readonly exit?: (code: number) => void;
  /** @default process.stderr */
  readonly stderr?: { write(text: string): unknown };
  /** @default process.stdout */
  readonly stdout?: { write(text: string): unknown };
}

/**
 * {@link loadConfig} for a service's main: on a {@link ConfigError} prints every problem to stderr
 * and exits 2, before anything listens or connects; `--help` prints the variables and exits 0.
 *
 * @example
 * const config = configOrExit(schema, { service: "ioasid-core" });
 */
export function configOrExit<const S extends ConfigSchema>(schema: S, options: ConfigOrExitOptions): Config<S> {
  const exit = options.exit ?? ((code: number) => process.exit(code));
  const argv = options.argv ?? process.argv.slice(2);
  const stdout = options.stdout ?? process.stdout;
  if (argv.includes("--help") || argv.includes("-h")) {
    stdout.write(`${options.service}: configured by environment variables\n${serviceUsage(options.service)}\n\n${describeConfig(schema)}\n`);
    exit(0);
    throw new Error("exit(0) returned");
  }
  if (argv.includes("--version")) {
    stdout.write(`${options.service} ${options.version ?? "unknown"}\n`);
    exit(0);
    throw new Error("exit(0) returned");
  }
  // Refused at once (clig.dev): an argument a service ignored used to start it anyway, so
  // `kvm --version` tried NATS for 10 s and then logged fatal (issue 17).
  if (argv.length > 0) {
    (options.stderr ?? process.stderr).write(`${options.service}: unknown argument "${argv[0]}"\n${serviceUsage(options.service)}\n`);
    exit(2);
    throw new Error("exit(2) returned");
  }
  try {
    return loadConfig(schema, options.env ?? process.env);
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err;
    (options.stderr ?? process.stderr).write(`${options.service}: ${err.message}\n`);
    exit(2);
    throw err;
  }
}

/** The usage line of a service: it takes no arguments but `--help` and `--version`. */
function serviceUsage(service: string): string {
  return `usage: ${service} [--help | --version]   (configured by environment variables only; \`${service} --help\` lists them)`;
}

/**
 * The version in the package.json one directory above a module: a service's `dist/main.js` (or
 * `src/main.ts`) passes `import.meta.url` and gets its workspace's version, for `--version`.
 * "unknown" when there is no readable package.json there.
 */
export function packageVersion(moduleUrl: string): string {
  try {
    const pkg = JSON.parse(readFileSync(new URL("../package.json", moduleUrl), "utf8")) as { version?: unknown };
    return typeof pkg.version === "string" ? pkg.version : "unknown";
  } catch {
    return "unknown";
  }
}

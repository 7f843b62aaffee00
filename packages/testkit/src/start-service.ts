import { spawnManaged, terminate, type ExitStatus } from "./managed-child.js";
import { waitFor } from "./wait-for.js";

/** Options of {@link startService}. */
export interface StartServiceOptions {
  /** Service name, for messages (`ioasid-core`). */
  readonly name: string;
  /** Absolute path of the built JS main (`services/ioasid-core/dist/main.js`). */
  readonly entry: string;
  /**
   * Environment of the service, over this process's own (see `inheritEnv`); set its address
   * variable to `127.0.0.1:0` for an ephemeral port. A variable set to undefined is removed.
   * `IOASID_METRICS_PORT` is `off` unless given here (tests run many services side by side; a
   * default metrics port would be taken twice): give `0` for an ephemeral one, see `metricsUrl`.
   */
  readonly env?: Readonly<Record<string, string | undefined>>;
  /** Start from this process's environment. @default true */
  readonly inheritEnv?: boolean;
  /** Arguments after the entry. */
  readonly args?: readonly string[];
  /**
   * A command the service runs under (`["ip", "netns", "exec", "<ns>"]`: inside a network
   * namespace); it must exec node, so the PID is the service's. @default none
   */
  readonly command?: readonly string[];
  /** Node options before the entry (`--enable-source-maps`). */
  readonly nodeArgs?: readonly string[];
  /** Working directory. @default this process's */
  readonly cwd?: string;
  /** Time the service gets to log its listening line, in ms. @default 10000 */
  readonly readyTimeoutMs?: number;
  /**
   * Aborting it before the service listens kills the process (SIGKILL) and the promise rejects: for
   * a service that listens only later, if ever (a standby core behind the serving core's lease).
   */
  readonly signal?: AbortSignal;
  /**
   * Told of each line of its output as it comes, from the start: what a test waits for before the
   * service listens (a line saying it retries something, say).
   */
  readonly onLine?: (line: string, stream: "stdout" | "stderr") => void;
}

/** A service process started by {@link startService}. */
export interface ServiceProcess {
  /** The name given in the options. */
  readonly name: string;
  /** `host:port` from its listening line, what clients connect to. */
  readonly address: string;
  /** Host part of `address` (IPv6 without brackets). */
  readonly host: string;
  /** The bound port. */
  readonly port: number;
  /** Its PID. */
  readonly pid: number;
  /** `http://host:port/metrics` from its `metrics listening` line, when it serves metrics. */
  readonly metricsUrl: string | undefined;
  /**
   * Sends `signal` (default SIGTERM), waits up to `timeoutMs` (default 5000) for the exit, then
   * SIGKILL. Resolves with the exit code (null when a signal ended it). Idempotent.
   */
  stop(signal?: NodeJS.Signals, timeoutMs?: number): Promise<number | null>;
  /** Sends `signal` (default SIGKILL: a crash) without waiting; await `exited` for the end. */
  kill(signal?: NodeJS.Signals): void;
  /** Its stdout and stderr so far (stderr lines prefixed `[stderr] `). */
  logs(): string;
  /** Settles when it has exited. */
  readonly exited: Promise<ExitStatus>;
}

/**
 * Starts a built service (`node <entry>`) and waits for the JSON line it logs once it listens,
 * `{"msg":"listening","address":"127.0.0.1:<port>",…}` (grpc-kit's GrpcServer writes it), taking
 * its address from there. If the process exits first, or the timeout passes (it is then killed),
 * the promise rejects with the last lines of its output.
 *
 * @example
 * const core = await startService({
 *   name: "ioasid-core",
 *   entry: fileURLToPath(new URL("../services/ioasid-core/dist/main.js", import.meta.url)),
 *   env: { IOASID_CORE_GRPC_ADDRESS: "127.0.0.1:0", NATS_URL: nats.url },
 * });
 * afterEach(() => core.stop());
 */
export async function startService(options: StartServiceOptions): Promise<ServiceProcess> {
  const { name, entry, readyTimeoutMs = 10_000 } = options;
  const env: NodeJS.ProcessEnv = options.inheritEnv === false ? {} : { ...process.env };
  env.IOASID_METRICS_PORT = "off";
  for (const [key, value] of Object.entries(options.env ?? {})) {
    if (value === undefined) delete env[key];
    else env[key] = value;
  }
  const prefix = options.command ?? [];
  const nodeArgv = [process.execPath, ...(options.nodeArgs ?? []), entry, ...(options.args ?? [])];
  const argv = [...prefix, ...nodeArgv];
  const managed = spawnManaged(argv[0]!, argv.slice(1), {
    env,
    ...(options.cwd === undefined ? {} : { cwd: options.cwd }),
  });

  let address: string | undefined;
  let metricsUrl: string | undefined;
  const scan = (line: string, stream: "stdout" | "stderr"): void => {
    if (address === undefined && stream === "stdout") address = listeningAddress(line);
    // The metrics endpoint binds before the gRPC server: its line comes first.
    if (metricsUrl === undefined && stream === "stdout") metricsUrl = metricsListening(line);
  };
  const stopScanning = managed.output.onLine(scan);
  if (options.onLine !== undefined) managed.output.onLine(options.onLine);
  const onAbort = () => void terminate(managed, "SIGKILL", 1000).catch(() => undefined);
  if (options.signal?.aborted === true) onAbort();
  else options.signal?.addEventListener("abort", onAbort, { once: true });
  const controller = new AbortController();
  managed.exited.then(
    (status) =>
      controller.abort(
        new Error(
          `service ${name} exited (code ${String(status.code)}, signal ${String(status.signal)}) before listening; last output:\n${managed.output.tail()}`,
        ),
      ),
    (err: unknown) => controller.abort(new Error(`service ${name} could not be started: ${String(err)}`, { cause: err })),
  );
  try {
    await waitFor(() => address !== undefined, {
      timeoutMs: readyTimeoutMs,
      message: `service ${name} to log "listening"`,
      signal: controller.signal,
    });
  } catch (err) {
    if (controller.signal.aborted) throw controller.signal.reason;
    await terminate(managed, "SIGKILL", 1000);
    throw new Error(`${(err as Error).message}; it was killed. Last output:\n${managed.output.tail()}`, { cause: err });
  } finally {
    stopScanning();
    options.signal?.removeEventListener("abort", onAbort);
  }

  const bound = address as string;
  const { host, port } = splitAddress(bound);
  let stopping: Promise<number | null> | undefined;
  return {
    name,
    address: bound,
    host,
    port,
    pid: managed.child.pid as number,
    metricsUrl,
    stop(signal: NodeJS.Signals = "SIGTERM", timeoutMs = 5000) {
      stopping ??= terminate(managed, signal, timeoutMs).then((status) => status.code);
      return stopping;
    },
    kill(signal: NodeJS.Signals = "SIGKILL") {
      if (managed.running()) managed.child.kill(signal);
    },
    logs: () => managed.output.text(),
    exited: managed.exited,
  };
}

/** The address of a `{"msg":"listening","address":…}` JSON log line, else undefined. */
function listeningAddress(line: string): string | undefined {
  if (!line.startsWith("{") || !line.includes('"listening"')) return undefined;
  try {
    const record = JSON.parse(line) as { msg?: unknown; address?: unknown };
    return record.msg === "listening" && typeof record.address === "string" ? record.address : undefined;
  } catch {
    return undefined;
  }
}

/** The url of a `{"msg":"metrics listening","url":…}` JSON log line, else undefined. */
function metricsListening(line: string): string | undefined {
  if (!line.startsWith("{") || !line.includes('"metrics listening"')) return undefined;
  try {
    const record = JSON.parse(line) as { msg?: unknown; url?: unknown };
    return record.msg === "metrics listening" && typeof record.url === "string" ? record.url : undefined;
  } catch {
    return undefined;
  }
}

function splitAddress(address: string): { host: string; port: number } {
  const colon = address.lastIndexOf(":");
  const host = address.slice(0, colon).replace(/^\[(.*)\]$/, "$1");
  return { host, port: Number(address.slice(colon + 1)) };
}

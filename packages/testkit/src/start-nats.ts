import { mkdtemp, rename, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { InstanceCredentials, NatsRole, RoleIdentity } from "@ioasid/security";
import { canConnect } from "./can-connect.js";
import { untilStopped } from "./stop-process.js";
import { spawnManaged, terminate, type ManagedChild } from "./managed-child.js";
import { dockerRequested, startNatsContainer } from "./start-nats-container.js";
import { TestAuthorization, type NatsRoleCredentials } from "./test-authorization.js";
import { waitFor } from "./wait-for.js";

export type { NatsRoleCredentials } from "./test-authorization.js";

/** The one-line command that installs the nats-server the tests need (Debian's 2.9.x package). */
export const NATS_INSTALL_COMMAND = "apt-get install -y nats-server";

/** Options of {@link startNats}. */
export interface StartNatsOptions {
  /** nats-server executable. @default env NATS_SERVER_BIN, else "nats-server" on the PATH */
  readonly binary?: string;
  /** Enable JetStream (file store in the temp dir). @default true */
  readonly jetstream?: boolean;
  /** Time nats-server gets to accept connections, in ms. @default 10000 */
  readonly readyTimeoutMs?: number;
  /**
   * Environment consulted for NATS_URL, NATS_SERVER_BIN, IOASID_TESTKIT_DOCKER, IOASID_NATS_IMAGE
   * and DOCKER_HOST. @default process.env
   */
  readonly env?: NodeJS.ProcessEnv;
  /**
   * Run nats-server in a Docker container through testcontainers (see {@link startNatsContainer})
   * instead of the local binary. @default true when IOASID_TESTKIT_DOCKER is 1 or true, else false
   */
  readonly docker?: boolean;
  /** Image for `docker`. @default env IOASID_NATS_IMAGE, else "ioasid-fabric-nats:dev" */
  readonly image?: string;
  /** Extra nats-server configuration lines appended to the generated file. */
  readonly extraConfig?: string;
  /**
   * Authorization (DESIGN §11): a NATS user per role instance, made by
   * {@link NatsServer.credentials}, with its role's permissions. `anonymous` says what a client
   * without a credential is: `"operator"` (the test itself, unlimited — the default, so a test's own
   * clients need nothing) or `"refuse"` (as in a real stack: the security tests). `false` turns
   * authorization off (anyone may do anything). The same in a container; ignored for an external server.
   * @default { anonymous: "operator" }
   */
  readonly auth?: false | { readonly anonymous?: "operator" | "refuse"; readonly prefix?: string };
  /**
   * Certificates too (DESIGN §11, mTLS): a CA of this server's own, and each credentials directory
   * {@link NatsServer.credentials} makes also holds its role instance's certificate — so a service
   * started with it serves and dials with mTLS, and the core authorizes by role. A test's own gRPC
   * clients then present {@link NatsServer.operatorTls}. @default false
   */
  readonly tls?: boolean;
}

/** A nats-server for a test: where it is, and how to stop, crash or restart it. */
export interface NatsServer {
  /** `nats://127.0.0.1:<port>`. */
  readonly url: string;
  /** Client port (the same across restarts). */
  readonly port: number;
  /** JetStream store directory, or undefined for an external server, a container, or without JetStream. */
  readonly storeDir: string | undefined;
  /** PID of the running nats-server, or undefined (external, in a container, or not running). */
  readonly pid: number | undefined;
  /** ID of its Docker container when the testkit runs it in one, else undefined. */
  readonly container: string | undefined;
  /** True when NATS_URL named a server the testkit does not own. */
  readonly external: boolean;
  /**
   * Stops nats-server (SIGTERM, SIGKILL after 5 s) and removes its temp dir. Idempotent; a no-op for
   * an external server.
   */
  stop(): Promise<void>;
  /**
   * Sends `signal` (default SIGKILL: a crash). For SIGKILL, SIGTERM, SIGINT and SIGQUIT it waits
   * for the process to exit (SIGKILL after 5 s), keeping its store dir for
   * {@link NatsServer.restart}; other signals (SIGHUP: reload config) are only delivered.
   * @throws Error on an external server.
   */
  kill(signal?: NodeJS.Signals): Promise<void>;
  /**
   * Restarts nats-server on the same port with the same store dir (stopping it first if running),
   * and waits until it accepts connections.
   * @throws Error on an external server, after stop(), or when it does not come back.
   */
  restart(): Promise<void>;
  /** nats-server's output so far. */
  logs(): string;
  /**
   * The credential of a role instance (made, added to the server's users and the configuration
   * reloaded the first time; the same one after). Undefined when the server has no authorization
   * (auth false, a container, an external server): the service then connects without one.
   */
  credentials(role: NatsRole, instance: string): Promise<NatsRoleCredentials | undefined>;
  /** The user and password of the unlimited operator user, or undefined without authorization. */
  readonly operator: { readonly user: string; readonly pass: string } | undefined;
  /** The operator's certificate (with `tls`), what a test's gRPC clients present; else undefined. */
  operatorTls(): Promise<InstanceCredentials | undefined>;
  /**
   * A credentials directory with a certificate only (with `tls`; else undefined): for an identity
   * without a NATS user, a VMM (VMMs reach VFIO only).
   */
  certificateDir(identity: RoleIdentity): Promise<string | undefined>;
}

/**
 * Starts a nats-server for a test, nats.js `nst` style: a config file in a fresh temp dir with
 * `port: -1` (ephemeral), host 127.0.0.1 and JetStream storing in that dir; the bound port is read
 * back from its log, and the promise resolves once a TCP connection succeeds. When the environment
 * has NATS_URL, that server is used instead and `stop()` does nothing. With `docker` (or
 * IOASID_TESTKIT_DOCKER=1) it runs in a container instead, through testcontainers.
 *
 * A missing nats-server is a failure whose message holds the install command, never a skip.
 *
 * @throws Error when nats-server is missing (`apt-get install -y nats-server`), exits, or is not
 * ready within `readyTimeoutMs`.
 * @example
 * let nats: NatsServer;
 * beforeEach(async () => { nats = await startNats(); });
 * afterEach(async () => { await nats.stop(); });
 */
export async function startNats(options: StartNatsOptions = {}): Promise<NatsServer> {
  const env = options.env ?? process.env;
  const external = env["NATS_URL"];
  if (external !== undefined && external !== "") return externalServer(external);
  if (options.docker ?? dockerRequested(env)) {
    return startNatsContainer({
      env,
      ...(options.auth === undefined ? {} : { auth: options.auth }),
      ...(options.tls === undefined ? {} : { tls: options.tls }),
      ...(options.image === undefined ? {} : { image: options.image }),
      ...(options.jetstream === undefined ? {} : { jetstream: options.jetstream }),
      ...(options.extraConfig === undefined ? {} : { extraConfig: options.extraConfig }),
      ...(options.readyTimeoutMs === undefined ? {} : { readyTimeoutMs: options.readyTimeoutMs }),
    });
  }

  const binary = options.binary ?? env["NATS_SERVER_BIN"] ?? "nats-server";
  const jetstream = options.jetstream ?? true;
  const readyTimeoutMs = options.readyTimeoutMs ?? 10_000;
  const dir = await mkdtemp(join(tmpdir(), "ioasid-nats-"));
  const storeDir = jetstream ? join(dir, "jetstream") : undefined;
  const configPath = join(dir, "nats-server.conf");
  const authorization = new TestAuthorization({
    dir,
    ...(options.auth === undefined ? {} : { auth: options.auth }),
    ...(options.tls === undefined ? {} : { tls: options.tls }),
  });
  let configuredPort = -1;

  // Written whole and renamed into place: a reload (SIGHUP) never reads a half-written file.
  const writeConfig = async (port: number): Promise<void> => {
    configuredPort = port;
    await writeFile(
      `${configPath}.new`,
      [
        "host: 127.0.0.1",
        `port: ${port}`,
        ...(storeDir === undefined ? [] : [`jetstream {`, `  store_dir: ${JSON.stringify(storeDir)}`, `}`]),
        ...authorization.configLines(),
        options.extraConfig ?? "",
        "",
      ].join("\n"),
      { mode: 0o600 },
    );
    await rename(`${configPath}.new`, configPath);
  };
  let managed: ManagedChild | undefined;
  let port: number;
  let stopped: Promise<void> | undefined;

  const launch = async (fixedPort: number | undefined): Promise<number> => {
    await writeConfig(fixedPort ?? -1);
    const m = spawnManaged(binary, ["-c", configPath], {});
    managed = m;
    try {
      return await waitUntilReady(m, binary, readyTimeoutMs);
    } catch (err) {
      await terminate(m, "SIGKILL", 1000).catch(() => undefined);
      throw err;
    }
  };

  try {
    port = await launch(undefined);
  } catch (err) {
    await rm(dir, { recursive: true, force: true });
    throw err;
  }

  return {
    get url() {
      return `nats://127.0.0.1:${port}`;
    },
    get port() {
      return port;
    },
    storeDir,
    container: undefined,
    get pid() {
      return managed?.running() === true ? managed.child.pid : undefined;
    },
    external: false,
    stop() {
      stopped ??= (async () => {
        if (managed !== undefined) await terminate(managed, "SIGTERM", 5000);
        await rm(dir, { recursive: true, force: true });
      })();
      return stopped;
    },
    async kill(signal: NodeJS.Signals = "SIGKILL") {
      if (managed === undefined || !managed.running()) return;
      if (!ENDING_SIGNALS.has(signal)) {
        managed.child.kill(signal);
        // kill() returns once the signal is sent, not once every thread of nats-server stopped (or
        // runs again): a test that stops the server and publishes at once could be answered by a
        // thread still running (role-state-retry, under load: a write acknowledged 24 ms after
        // SIGSTOP). Wait until the kernel says so.
        if (signal === "SIGSTOP" || signal === "SIGCONT") await untilStopped(managed.child.pid!, signal === "SIGSTOP", "nats-server");
        return;
      }
      await terminate(managed, signal, 5000);
    },
    async restart() {
      if (stopped !== undefined) throw new Error("nats-server was stopped; start a new one");
      if (managed !== undefined) await terminate(managed, "SIGTERM", 5000);
      const again = await launch(port);
      if (again !== port) throw new Error(`nats-server restarted on port ${again}, not ${port}`);
    },
    logs: () => managed?.output.text() ?? "",
    operator: authorization.operator,
    certificateDir: (identity: RoleIdentity) => authorization.certificateDir(identity),
    operatorTls: () => authorization.operatorTls(),
    credentials(role: NatsRole, instance: string) {
      return authorization.credentials(role, instance, {
        write: () => writeConfig(configuredPort === -1 ? port : configuredPort),
        signal: () => {
          if (managed?.running() !== true) return Promise.resolve(false);
          managed.child.kill("SIGHUP");
          return Promise.resolve(true);
        },
        url: () => `nats://127.0.0.1:${port}`,
      });
    },
  };
}

/** Signals after which nats-server exits. */
const ENDING_SIGNALS: ReadonlySet<NodeJS.Signals> = new Set(["SIGKILL", "SIGTERM", "SIGINT", "SIGQUIT"]);

const LISTENING = /Listening for client connections on (\S+):(\d+)/;
const READY = /Server is ready/;

/** Resolves with the client port once nats-server says it is ready and accepts a TCP connection. */
async function waitUntilReady(managed: ManagedChild, binary: string, timeoutMs: number): Promise<number> {
  let port: number | undefined;
  let ready = false;
  const scan = (line: string): void => {
    const match = LISTENING.exec(line);
    if (match !== null) port = Number(match[2]);
    if (READY.test(line)) ready = true;
  };
  const stopScanning = managed.output.onLine(scan);
  for (const line of managed.output.text().split("\n")) scan(line);
  // The process ending first (or never starting) stops the wait with the reason why.
  const controller = new AbortController();
  managed.exited.then(
    (status) =>
      controller.abort(
        new Error(
          `nats-server exited (code ${String(status.code)}, signal ${String(status.signal)}) before it was ready; last output:\n${managed.output.tail()}`,
        ),
      ),
    (err: unknown) => controller.abort(missingBinaryError(binary, err)),
  );
  try {
    await waitFor(async () => ready && port !== undefined && (await canConnect("127.0.0.1", port, 500)), {
      timeoutMs,
      message: "nats-server to accept connections",
      signal: controller.signal,
    });
  } catch (err) {
    if (controller.signal.aborted) throw controller.signal.reason;
    throw new Error(`${(err as Error).message}; last output:\n${managed.output.tail()}`, { cause: err });
  } finally {
    stopScanning();
  }
  if (port === undefined) throw new Error("nats-server reported no client port");
  return port;
}

function missingBinaryError(binary: string, err: unknown): Error {
  const code = (err as NodeJS.ErrnoException).code;
  const what = code === "ENOENT" ? "not found" : `cannot be run (${String(code ?? err)})`;
  return new Error(`nats-server ${what} at "${binary}": install it with \`${NATS_INSTALL_COMMAND}\` (or set NATS_URL)`, {
    cause: err,
  });
}

function externalServer(url: string): NatsServer {
  const parsed = new URL(url.split(",")[0] ?? url);
  const refuse = (what: string) => () => Promise.reject(new Error(`cannot ${what} the external nats-server at NATS_URL=${url}`));
  return {
    url,
    port: Number(parsed.port === "" ? 4222 : parsed.port),
    storeDir: undefined,
    pid: undefined,
    container: undefined,
    external: true,
    stop: () => Promise.resolve(),
    kill: refuse("kill"),
    restart: refuse("restart"),
    logs: () => "",
    // Its users are not ours to make: services connect as the environment says.
    credentials: () => Promise.resolve(undefined),
    operator: undefined,
    operatorTls: () => Promise.resolve(undefined),
    certificateDir: () => Promise.resolve(undefined),
  };
}

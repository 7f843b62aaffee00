import { freePort } from "./free-port.js";
import { spawnSync } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Writable } from "node:stream";
import type * as Testcontainers from "testcontainers";
import { canConnect } from "./can-connect.js";
import type { NatsServer } from "./start-nats.js";
import { TestAuthorization, type TestAuthorizationOptions } from "./test-authorization.js";

/** The NATS image docker-compose.yml builds (deploy/nats.Dockerfile): Debian's nats-server. */
export const NATS_IMAGE = "ioasid-fabric-nats:dev";

/** Options of {@link startNatsContainer}. */
export interface StartNatsContainerOptions {
  /** Image whose entrypoint is nats-server. @default env IOASID_NATS_IMAGE, else {@link NATS_IMAGE} */
  readonly image?: string;
  /** Enable JetStream (file store inside the container). @default true */
  readonly jetstream?: boolean;
  /** Time the container gets to say "Server is ready", in ms. @default 30000 */
  readonly readyTimeoutMs?: number;
  /** Extra nats-server configuration lines appended to the generated file. */
  readonly extraConfig?: string;
  /** Environment consulted for IOASID_NATS_IMAGE and DOCKER_HOST. @default process.env */
  readonly env?: NodeJS.ProcessEnv;
  /** Authorization, as `startNats`'s (a user per role instance; its credentials on this machine). @default { anonymous: "operator" } */
  readonly auth?: TestAuthorizationOptions["auth"];
  /** Certificates too, as `startNats`'s. @default false */
  readonly tls?: boolean;
}

/** Where the generated configuration goes in the container, and the JetStream store. */
const CONFIG_PATH = "/etc/nats/testkit.conf";
const STORE_DIR = "/data/jetstream";

/** Whether `env` asks the testkit to run NATS in a container (IOASID_TESTKIT_DOCKER=1 or true). */
export function dockerRequested(env: NodeJS.ProcessEnv): boolean {
  const v = env["IOASID_TESTKIT_DOCKER"];
  return v === "1" || v === "true";
}

const live = new Set<string>();
let hooked = false;

/**
 * Removes, by ID, every container this process started and has not stopped yet, when it exits
 * (a test that forgets its teardown, or a runner that dies): Ryuk's job, without Ryuk's image.
 */
function removeOnExit(id: string): void {
  live.add(id);
  if (hooked) return;
  hooked = true;
  process.once("exit", () => {
    if (live.size > 0) spawnSync("docker", ["rm", "--force", ...live], { stdio: "ignore" });
  });
}

/** A free TCP port of 127.0.0.1 now (the container binds it a moment later, on the host network). */
/**
 * Starts nats-server in a Docker container through testcontainers, on the host network (the
 * engine may have no bridge), listening on 127.0.0.1 and a port chosen free on the host, with
 * JetStream storing inside the container. Resolves once the container logged "Server is ready" and
 * the port accepts a TCP connection. Ryuk is disabled unless TESTCONTAINERS_RYUK_DISABLED says
 * otherwise (its image would have to be pulled); containers are removed by ID when this process
 * exits instead. TESTCONTAINERS_HOST_OVERRIDE defaults to 127.0.0.1. `kill()` is `docker kill`, `restart()` starts the same container again (same port,
 * JetStream kept), `stop()` removes it. `pid` and `storeDir` are undefined (both are the
 * container's); `container` is its ID.
 *
 * @throws Error when testcontainers is not installed, no Docker engine answers (DOCKER_HOST), the
 *   image is not in the engine (it is never pulled), or nats-server is not ready in time.
 */
export async function startNatsContainer(options: StartNatsContainerOptions = {}): Promise<NatsServer> {
  const env = options.env ?? process.env;
  const image = options.image ?? env["IOASID_NATS_IMAGE"] ?? NATS_IMAGE;
  const jetstream = options.jetstream ?? true;
  // testcontainers reads these from process.env. No Ryuk (its image would have to be pulled), and
  // the host is this machine's loopback: on the host network that is where the container listens
  // (without it, testcontainers running inside a container looks for a bridge network's gateway).
  process.env["TESTCONTAINERS_RYUK_DISABLED"] ??= "true";
  process.env["TESTCONTAINERS_HOST_OVERRIDE"] ??= "127.0.0.1";

  let tc: typeof Testcontainers;
  try {
    tc = await import("testcontainers");
  } catch (err) {
    throw new Error("testcontainers is not installed (a devDependency of @ioasid/testkit): run `npm ci`", { cause: err });
  }
  let client: Awaited<ReturnType<typeof tc.getContainerRuntimeClient>>;
  try {
    client = await tc.getContainerRuntimeClient();
  } catch (err) {
    throw new Error(
      `IOASID_TESTKIT_DOCKER is set but no Docker engine answers (DOCKER_HOST=${env["DOCKER_HOST"] ?? "unset"}): ${(err as Error).message}; start one, or unset IOASID_TESTKIT_DOCKER to use the local nats-server`,
      { cause: err },
    );
  }
  if (!(await client.image.exists(tc.ImageName.fromString(image)))) {
    throw new Error(
      `image ${image} is not in the Docker engine (the testkit never pulls): build it with \`docker compose build nats\`, or set IOASID_NATS_IMAGE`,
    );
  }

  const port = await freePort();
  // The credentials live on this machine (the services run here); the users in the container's config.
  const credentialsRoot = await mkdtemp(join(tmpdir(), "ioasid-nats-container-"));
  const authorization = new TestAuthorization({
    dir: credentialsRoot,
    ...(options.auth === undefined ? {} : { auth: options.auth }),
    ...(options.tls === undefined ? {} : { tls: options.tls }),
  });
  const config = (): string =>
    [
      "host: 127.0.0.1",
      `port: ${port}`,
      ...(jetstream ? ["jetstream {", `  store_dir: ${JSON.stringify(STORE_DIR)}`, "}"] : []),
      ...authorization.configLines(),
      options.extraConfig ?? "",
      "",
    ].join("\n");
  let output = "";
  const follow = (stream: NodeJS.ReadableStream): void => {
    stream.pipe(
      new Writable({
        write(chunk: Buffer, _encoding, done) {
          output += chunk.toString();
          done();
        },
      }),
    );
  };
  const started = await new tc.GenericContainer(image)
    .withNetworkMode("host")
    .withCopyContentToContainer([{ content: config(), target: CONFIG_PATH }])
    .withCommand(["-c", CONFIG_PATH])
    .withPullPolicy({ shouldPull: () => false })
    .withWaitStrategy(tc.Wait.forLogMessage(/Server is ready/))
    .withStartupTimeout(options.readyTimeoutMs ?? 30_000)
    .withLogConsumer(follow)
    .start();
  const id = started.getId();
  removeOnExit(id);
  const ready = async (): Promise<void> => {
    const deadline = Date.now() + (options.readyTimeoutMs ?? 30_000);
    while (!(await canConnect("127.0.0.1", port, 500))) {
      if (Date.now() > deadline)
        throw new Error(`nats-server in container ${id.slice(0, 12)} does not accept connections on 127.0.0.1:${port}; last output:\n${output.slice(-2000)}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  };
  await ready();

  const container = client.container.getById(id);
  const running = async (): Promise<boolean> => (await client.container.inspect(container)).State.Running;
  let stopped: Promise<void> | undefined;
  return {
    url: `nats://127.0.0.1:${port}`,
    port,
    storeDir: undefined,
    pid: undefined,
    container: id,
    external: false,
    stop() {
      stopped ??= (async () => {
        await started.stop({ timeout: 5000, remove: true, removeVolumes: true });
        live.delete(id);
        await rm(credentialsRoot, { recursive: true, force: true });
      })();
      return stopped;
    },
    async kill(signal: NodeJS.Signals = "SIGKILL") {
      if (stopped !== undefined || !(await running())) return;
      await container.kill({ signal });
      if (!["SIGKILL", "SIGTERM", "SIGINT", "SIGQUIT"].includes(signal)) return;
      const deadline = Date.now() + 5000;
      while (await running()) {
        if (Date.now() > deadline) {
          await container.kill({ signal: "SIGKILL" });
          break;
        }
        await new Promise((r) => setTimeout(r, 50));
      }
    },
    async restart() {
      if (stopped !== undefined) throw new Error("the NATS container was stopped; start a new one");
      const since = Math.floor(Date.now() / 1000);
      // Through the engine, not StartedTestContainer.restart: that one waits again for the log line
      // with `since` = the container's StartedAt, and a line written in the same instant can be
      // missed (a 30 s timeout seen in CI). Ready is: nats-server accepts connections.
      await client.container.restart(container, { timeout: 5000 });
      // The first log stream ended with the container's first life.
      follow(await client.container.logs(container, { since }));
      await ready();
    },
    logs: () => output,
    operator: authorization.operator,
    operatorTls: () => authorization.operatorTls(),
    certificateDir: (identity) => authorization.certificateDir(identity),
    // A new user: the configuration copied into the container again, and nats-server reloads (SIGHUP).
    credentials: (role, instance) =>
      authorization.credentials(role, instance, {
        write: () => started.copyContentToContainer([{ content: config(), target: CONFIG_PATH }]),
        signal: async () => {
          if (stopped !== undefined || !(await running())) return false;
          await container.kill({ signal: "SIGHUP" });
          return true;
        },
        url: () => `nats://127.0.0.1:${port}`,
      }),
  };
}

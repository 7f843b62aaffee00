import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { canConnect } from "./can-connect.js";
import { freePort } from "./free-port.js";
import { spawnManaged, terminate, type ManagedChild } from "./managed-child.js";
import { waitFor } from "./wait-for.js";

// A NATS cluster on loopback for tests (issue 18 item 1, DESIGN §13 "beyond one machine"): n
// nats-servers, each with JetStream in a store of its own, routes between all of them, so every
// stream created with replicas 3 keeps a copy on each and survives one server's death. No
// authorization (as `ioasidctl up --insecure`): what is tested here is replication and failover.

/** Options of {@link startNatsCluster}. */
export interface StartNatsClusterOptions {
  /** How many servers. @default 3 */
  readonly size?: number;
  /** nats-server executable. @default env NATS_SERVER_BIN, else "nats-server" on the PATH */
  readonly binary?: string;
  /** Time the cluster gets until every server accepts clients and JetStream has a meta leader, ms. @default 30000 */
  readonly readyTimeoutMs?: number;
}

/** One server of a {@link NatsCluster}. */
export interface ClusterNode {
  /** "n0", "n1", … (its server_name). */
  readonly name: string;
  /** `nats://127.0.0.1:<port>`. */
  readonly url: string;
  readonly port: number;
  /** PID while it runs. */
  readonly pid: number | undefined;
  /** SIGKILL (a crash): waits until it exited; its store stays for {@link ClusterNode.restart}. */
  kill(): Promise<void>;
  /** Starts it again on the same ports with the same store, and waits until it accepts clients. */
  restart(): Promise<void>;
  /** Its output so far. */
  logs(): string;
}

/** A NATS cluster on loopback. */
export interface NatsCluster {
  readonly nodes: readonly ClusterNode[];
  /** Every node's client URL, comma-separated: what NATS_URL names for a service of the cluster. */
  readonly urls: string;
  /** Stops every node (SIGTERM, SIGKILL after 5 s) and removes the stores. Idempotent. */
  stop(): Promise<void>;
}

/** Ports the kernel has free now, n at once (each distinct). */
async function freePorts(n: number): Promise<number[]> {
  const ports = new Set<number>();
  while (ports.size < n) ports.add(await freePort());
  return [...ports];
}

/**
 * Starts `size` nats-servers clustered on loopback (routes between all, JetStream on each) and
 * waits until each accepts clients and the JetStream cluster has elected its meta leader (a
 * stream with replicas can be created).
 * @throws Error when nats-server is missing, exits, or the cluster is not ready in time (its logs in the message)
 */
export async function startNatsCluster(options: StartNatsClusterOptions = {}): Promise<NatsCluster> {
  const size = options.size ?? 3;
  const binary = options.binary ?? process.env["NATS_SERVER_BIN"] ?? "nats-server";
  const readyTimeoutMs = options.readyTimeoutMs ?? 30_000;
  const dir = await mkdtemp(join(tmpdir(), "ioasid-nats-cluster-"));
  const ports = await freePorts(2 * size);
  const clientPorts = ports.slice(0, size);
  const routePorts = ports.slice(size);
  const routes = routePorts.map((p) => `nats-route://127.0.0.1:${p}`);

  const children: (ManagedChild | undefined)[] = Array.from({ length: size }, () => undefined);
  const configOf = async (i: number): Promise<string> => {
    const nodeDir = join(dir, `n${i}`);
    await mkdir(nodeDir, { recursive: true });
    const path = join(nodeDir, "nats-server.conf");
    await writeFile(
      path,
      [
        `server_name: n${i}`,
        "host: 127.0.0.1",
        `port: ${clientPorts[i]!}`,
        `jetstream { store_dir: ${JSON.stringify(join(nodeDir, "jetstream"))} }`,
        "cluster {",
        "  name: ioasid",
        "  host: 127.0.0.1",
        `  port: ${routePorts[i]!}`,
        `  routes: [${routes.filter((_, j) => j !== i).join(", ")}]`,
        "}",
        "",
      ].join("\n"),
    );
    return path;
  };
  const launch = async (i: number): Promise<void> => {
    const m = spawnManaged(binary, ["-c", await configOf(i)], {});
    children[i] = m;
    await waitFor(() => canConnect("127.0.0.1", clientPorts[i]!, 500), {
      timeoutMs: readyTimeoutMs,
      message: `nats-server n${i} to accept clients`,
    }).catch((err: unknown) => {
      throw new Error(`${(err as Error).message}; its output:\n${m.output.tail()}`, { cause: err });
    });
  };
  const stopAll = async () => {
    await Promise.all(children.map((m) => (m === undefined ? undefined : terminate(m, "SIGTERM", 5000).catch(() => undefined))));
  };

  try {
    await Promise.all(clientPorts.map((_, i) => launch(i)));
    // JetStream in a cluster serves only once the servers agreed on a meta leader.
    await waitFor(
      () =>
        children.some((m) => m !== undefined && /JetStream cluster new metadata leader|Self is new JetStream cluster metadata leader/.test(m.output.text())),
      {
        timeoutMs: readyTimeoutMs,
        message: "the JetStream cluster to elect its meta leader",
      },
    );
  } catch (err) {
    await stopAll();
    await rm(dir, { recursive: true, force: true });
    throw err;
  }

  let stopped: Promise<void> | undefined;
  const nodes: ClusterNode[] = clientPorts.map((port, i) => ({
    name: `n${i}`,
    url: `nats://127.0.0.1:${port}`,
    port,
    get pid() {
      const m = children[i];
      return m?.running() === true ? m.child.pid : undefined;
    },
    async kill() {
      const m = children[i];
      if (m !== undefined && m.running()) await terminate(m, "SIGKILL", 5000);
    },
    async restart() {
      if (stopped !== undefined) throw new Error("the cluster was stopped");
      const m = children[i];
      if (m !== undefined && m.running()) await terminate(m, "SIGTERM", 5000);
      await launch(i);
    },
    logs: () => children[i]?.output.text() ?? "",
  }));
  return {
    nodes,
    urls: nodes.map((n) => n.url).join(","),
    stop() {
      stopped ??= (async () => {
        await stopAll();
        await rm(dir, { recursive: true, force: true });
      })();
      return stopped;
    },
  };
}

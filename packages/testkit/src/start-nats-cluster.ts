import { mkdir, mkdtemp, rename, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connect } from "@nats-io/transport-node";
import { natsConnectOptions, type InstanceCredentials, type NatsRole, type RoleIdentity } from "@ioasid/security";
import { canConnect } from "./can-connect.js";
import { freePort } from "./free-port.js";
import { readNatsInfo } from "./read-nats-info.js";
import { spawnManaged, terminate, type ManagedChild } from "./managed-child.js";
import { TestAuthorization, type NatsRoleCredentials } from "./test-authorization.js";
import { waitFor } from "./wait-for.js";

// A NATS cluster on loopback for tests (issue 18 item 1, DESIGN §13 "beyond one machine"): n
// nats-servers, each with JetStream in a store of its own, routes between all of them, so every
// stream created with replicas 3 keeps a copy on each and survives one server's death. No
// authorization by default (as `ioasidctl up --insecure`): what most cluster tests test is
// replication and failover; with `auth` (and `tls`) every server has the same users, each role
// instance's with its role's permissions (DESIGN §11), as `startNats` makes them — the chaos
// runner's cluster (`--nats-cluster`) is authenticated as its single server is.

/** Options of {@link startNatsCluster}. */
export interface StartNatsClusterOptions {
  /** How many servers. @default 3 */
  readonly size?: number;
  /** nats-server executable. @default env NATS_SERVER_BIN, else "nats-server" on the PATH */
  readonly binary?: string;
  /** Time the cluster gets until every server accepts clients and JetStream has a meta leader, ms. @default 30000 */
  readonly readyTimeoutMs?: number;
  /**
   * Authorization as {@link StartNatsOptions.auth} says, on every server (the same users; a new
   * one is added to each server's configuration and each reloaded). @default false (none)
   */
  readonly auth?: false | { readonly anonymous?: "operator" | "refuse"; readonly prefix?: string };
  /** Certificates too, as {@link StartNatsOptions.tls} says. @default false */
  readonly tls?: boolean;
  /**
   * Where each server runs when not every one on loopback (issue 18 item 5: each on a host of a
   * network-namespace lab). @default every server on 127.0.0.1, started directly
   */
  readonly placement?: NatsClusterPlacement;
}

/**
 * Where the servers of a {@link startNatsCluster} run: each started under a command prefix (`ip
 * netns exec <ns>`), listening for clients and routes on an address of its own, and reached from
 * this process through a `host:port` the placement provides (a gateway into the namespace).
 */
export interface NatsClusterPlacement {
  /** The argv prefix server i is started under (`["ip", "netns", "exec", "<ns>"]`); empty: none. */
  command(i: number): readonly string[];
  /** The address server i listens on, for clients and routes; its peers route to it there. */
  host(i: number): string;
  /**
   * A `host:port` of this process's namespace that carries connections to server i's client
   * port: made once, before the server starts, and kept across its restarts.
   */
  reach(i: number, port: number): Promise<string>;
}

/** One server of a {@link NatsCluster}. */
export interface ClusterNode {
  /** "n0", "n1", … (its server_name). */
  readonly name: string;
  /** `nats://127.0.0.1:<port>`: where this process reaches it (with a placement, its gateway). */
  readonly url: string;
  readonly port: number;
  /**
   * `nats://<host>:<port>` where it listens itself: the same as {@link ClusterNode.url} on loopback;
   * with a placement, its own address, reachable from the placement's network (another namespace of
   * the lab) rather than from this process.
   */
  readonly listenUrl: string;
  /** PID while it runs. */
  readonly pid: number | undefined;
  /** SIGKILL (a crash): waits until it exited; its store stays for {@link ClusterNode.restart}. */
  kill(): Promise<void>;
  /**
   * Starts it again on the same ports with the same store, and waits until it accepts clients and
   * its JetStream answers (a restarted server accepts clients seconds before that: a client that
   * reconnects to it meanwhile is told "jetstream not enabled").
   */
  restart(): Promise<void>;
  /** Its output so far. */
  logs(): string;
  /** Its JetStream store directory (kept across kill and restart, removed by {@link NatsCluster.stop}). */
  readonly storeDir: string;
}

/** A NATS cluster on loopback. */
export interface NatsCluster {
  readonly nodes: readonly ClusterNode[];
  /** Every node's client URL, comma-separated: what NATS_URL names for a service of the cluster. */
  readonly urls: string;
  /**
   * Waits until JetStream is whole again after a server's loss: every stream has a leader and
   * every replica is current (a stream whose leader died takes seconds to elect another, and a
   * restarted server's replicas catch up; writes stall meanwhile).
   * @throws Error naming the streams that are not, after `timeoutMs` (default 30000)
   */
  untilStreamsCurrent(timeoutMs?: number): Promise<void>;
  /** The same as {@link NatsCluster.urls}: what `natsEnv` puts in NATS_URL. */
  readonly url: string;
  /**
   * The credential of a role instance (as {@link NatsServer.credentials}): made, added to every
   * server's users and each reloaded the first time — resolved once every running server accepts
   * it. Undefined without authorization.
   */
  credentials(role: NatsRole, instance: string): Promise<NatsRoleCredentials | undefined>;
  /** The unlimited operator user, or undefined without authorization. */
  readonly operator: { readonly user: string; readonly pass: string } | undefined;
  /** The operator's certificate (with `tls`), else undefined. */
  operatorTls(): Promise<InstanceCredentials | undefined>;
  /** A credentials directory with a certificate only (with `tls`), else undefined. */
  certificateDir(identity: RoleIdentity): Promise<string | undefined>;
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
  const placement = options.placement;
  const hostOf = (i: number): string => placement?.host(i) ?? "127.0.0.1";
  const routes = routePorts.map((p, i) => `nats-route://${hostOf(i)}:${p}`);
  // Where this process reaches each server's client port: itself on loopback, else the placement's gateway.
  const reached: { host: string; port: number }[] = [];
  for (const [i, p] of clientPorts.entries()) {
    const at = placement === undefined ? `127.0.0.1:${p}` : await placement.reach(i, p);
    const colon = at.lastIndexOf(":");
    reached.push({ host: at.slice(0, colon), port: Number(at.slice(colon + 1)) });
  }
  const urlOf = (i: number): string => `nats://${reached[i]!.host}:${reached[i]!.port}`;

  const children: (ManagedChild | undefined)[] = Array.from({ length: size }, () => undefined);
  const authorization = new TestAuthorization({
    dir,
    auth: options.auth ?? false,
    ...(options.tls === undefined ? {} : { tls: options.tls }),
  });
  // Written whole and renamed into place: a reload (SIGHUP) never reads a half-written file.
  const configOf = async (i: number): Promise<string> => {
    const nodeDir = join(dir, `n${i}`);
    await mkdir(nodeDir, { recursive: true });
    const path = join(nodeDir, "nats-server.conf");
    await writeFile(
      `${path}.new`,
      [
        `server_name: n${i}`,
        `host: ${hostOf(i)}`,
        `port: ${clientPorts[i]!}`,
        `jetstream { store_dir: ${JSON.stringify(join(nodeDir, "jetstream"))} }`,
        "cluster {",
        "  name: ioasid",
        `  host: ${hostOf(i)}`,
        `  port: ${routePorts[i]!}`,
        `  routes: [${routes.filter((_, j) => j !== i).join(", ")}]`,
        "}",
        ...authorization.configLines(),
        "",
      ].join("\n"),
      { mode: 0o600 },
    );
    await rename(`${path}.new`, path);
    return path;
  };
  const launch = async (i: number): Promise<void> => {
    const prefix = placement?.command(i) ?? [];
    const m = spawnManaged(prefix[0] ?? binary, [...prefix.slice(1), ...(prefix.length > 0 ? [binary] : []), "-c", await configOf(i)], {});
    children[i] = m;
    // Through a gateway a TCP connection is accepted before the server listens: its INFO line is what says it does.
    const ready = () =>
      placement === undefined
        ? canConnect("127.0.0.1", clientPorts[i]!, 500)
        : readNatsInfo(reached[i]!.port, reached[i]!.host).then(
            () => true,
            () => false,
          );
    await waitFor(ready, {
      timeoutMs: readyTimeoutMs,
      message: `nats-server n${i} to accept clients`,
    }).catch((err: unknown) => {
      throw new Error(`${(err as Error).message}; its output:\n${m.output.tail()}`, { cause: err });
    });
  };
  /** Waits until server i's JetStream answers an account-info request (as the operator with authorization). */
  const untilJetStream = async (i: number): Promise<void> => {
    const auth = authorization.operator === undefined ? {} : { user: authorization.operator.user, pass: authorization.operator.pass };
    let last = "no answer yet";
    await waitFor(
      async () => {
        const nc = await connect({ servers: urlOf(i), reconnect: false, timeout: 2000, ...auth }).catch((err: unknown) => {
          last = String(err);
          return undefined;
        });
        if (nc === undefined) return false;
        try {
          const m = await nc.request("$JS.API.INFO", undefined, { timeout: 1000 });
          const answer = JSON.parse(m.string()) as { error?: { description?: string } };
          last = answer.error?.description ?? "ok";
          return answer.error === undefined;
        } catch (err) {
          last = String(err);
          return false;
        } finally {
          await nc.close().catch(() => undefined);
        }
      },
      { timeoutMs: readyTimeoutMs, intervalMs: 100, message: `nats-server n${i}'s JetStream to answer` },
    ).catch((err: unknown) => {
      throw new Error(`${(err as Error).message}; last: ${last}; its output:\n${children[i]?.output.tail() ?? ""}`, { cause: err });
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
  const nodes: ClusterNode[] = clientPorts.map((_, i) => ({
    name: `n${i}`,
    url: urlOf(i),
    port: reached[i]!.port,
    listenUrl: `nats://${hostOf(i)}:${clientPorts[i]!}`,
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
      // Checked again: a stop() while this one waited must not be followed by a server it never stops.
      if (stopped !== undefined) throw new Error("the cluster was stopped");
      await launch(i);
      await untilJetStream(i);
    },
    logs: () => children[i]?.output.text() ?? "",
    storeDir: join(dir, `n${i}`, "jetstream"),
  }));
  const running = () => nodes.filter((n) => n.pid !== undefined);
  const untilStreamsCurrent = async (timeoutMs = 30_000): Promise<void> => {
    const auth = authorization.operator === undefined ? {} : { user: authorization.operator.user, pass: authorization.operator.pass };
    let behind: string[] = ["(not asked yet)"];
    const request = async (nc: Awaited<ReturnType<typeof connect>>, subject: string): Promise<Record<string, unknown>> =>
      JSON.parse((await nc.request(subject, undefined, { timeout: 2000 })).string()) as Record<string, unknown>;
    await waitFor(
      async () => {
        const nc = await connect({ servers: running().map((n) => n.url), reconnect: false, timeout: 2000, ...auth }).catch(() => undefined);
        if (nc === undefined) return false;
        try {
          // An error answer (a meta group without a leader answers 503) is not "no streams".
          const listed = await request(nc, "$JS.API.STREAM.NAMES");
          if (listed["error"] !== undefined) {
            behind = [`stream names: ${JSON.stringify(listed["error"])}`];
            return false;
          }
          const names = (listed["streams"] as string[] | null) ?? [];
          const now: string[] = [];
          for (const name of names) {
            const info = await request(nc, `$JS.API.STREAM.INFO.${name}`);
            const c = info["cluster"] as { leader?: string; replicas?: { name: string; current: boolean; offline?: boolean }[] } | undefined;
            if (info["error"] !== undefined || c?.leader === undefined) now.push(`${name} (no leader)`);
            else for (const r of c.replicas ?? []) if (!r.current || r.offline === true) now.push(`${name} (${r.name} not current)`);
          }
          behind = now;
          return now.length === 0;
        } catch (err) {
          behind = [String(err)];
          return false;
        } finally {
          await nc.close().catch(() => undefined);
        }
      },
      { timeoutMs, intervalMs: 100, message: "every JetStream stream to have a leader and every replica to be current" },
    ).catch((err: unknown) => {
      throw new Error(`${(err as Error).message}: ${behind.join(", ")}`, { cause: err });
    });
  };
  const urls = nodes.map((n) => n.url).join(",");
  return {
    nodes,
    urls,
    url: urls,
    untilStreamsCurrent,
    operator: authorization.operator,
    operatorTls: () => authorization.operatorTls(),
    certificateDir: (identity: RoleIdentity) => authorization.certificateDir(identity),
    async credentials(role: NatsRole, instance: string) {
      const made = await authorization.credentials(role, instance, {
        write: async () => {
          for (let i = 0; i < size; i++) await configOf(i);
        },
        signal: () => {
          const on = children.filter((m) => m?.running() === true);
          for (const m of on) m!.child.kill("SIGHUP");
          return Promise.resolve(on.length > 0);
        },
        url: () => running()[0]?.url ?? nodes[0]!.url,
      });
      // In effect on every server that runs, not only on the one the reload was checked on.
      if (made !== undefined) {
        for (const [i, n] of nodes.entries()) {
          if (n.pid === undefined) continue;
          let lastSignal = performance.now();
          await waitFor(
            async () => {
              const nc = await connect({ servers: n.url, ...natsConnectOptions(made.credential), reconnect: false, timeout: 2000 }).catch(() => undefined);
              await nc?.close();
              if (nc === undefined && performance.now() - lastSignal > 1000) {
                children[i]?.child.kill("SIGHUP");
                lastSignal = performance.now();
              }
              return nc !== undefined || n.pid === undefined;
            },
            { timeoutMs: 30_000, intervalMs: 50, message: `nats-server ${n.name} to accept the new user ${role}/${instance}` },
          );
        }
      }
      return made;
    },
    stop() {
      stopped ??= (async () => {
        await stopAll();
        await rm(dir, { recursive: true, force: true });
      })();
      return stopped;
    },
  };
}

import { execFile, spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, readdirSync, rmSync } from "node:fs";
import { connect, createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

// Several "hosts" on one machine (issue 18 item 5, DESIGN §13 "beyond one machine"): each host a
// network namespace of its own with one interface, all plugged into a Linux bridge that lives in a
// switch namespace of its own — so a partition between two hosts is a frame the switch drops, as
// on a real network, not a proxy's decision. Nothing is added to the root namespace: the veth
// pairs are made inside the switch namespace (one end moved straight into the host's), the
// addresses exist only in the hosts' namespaces, and nothing routes out of them. Processes of the
// root namespace reach a service inside a host through a relay (see {@link NetnsLab.forward}):
// AF_UNIX pathname sockets are shared across network namespaces.

/** Whether this machine can make a lab: yes, or why not. */
export type NetnsAvailability =
  | { readonly available: true }
  | {
      readonly available: false;
      /** What is missing, in a sentence ("not root (uid 1000): network namespaces need CAP_SYS_ADMIN"). */
      readonly reason: string;
      /** True when the only thing missing is root: the one case a test may skip for. */
      readonly notRoot: boolean;
    };

/** Options of {@link createNetnsLab}. */
export interface NetnsLabOptions {
  /** The hosts' names: lower-case letters, digits and dashes, at most 16 characters ("n0", "core-a"). */
  readonly hosts: readonly string[];
  /** Third octet of the lab's 10.231.x.0/24. @default one no other lab and no root address uses */
  readonly subnet?: number;
  /** Time each `ip`/`ebtables` command gets, in ms. @default 10000 */
  readonly commandTimeoutMs?: number;
}

/** A fault the switch applies until it is healed. */
export interface LabCut {
  /** "n0 ⇹ n1", "n2 isolated". */
  readonly description: string;
  /** Removes this cut's rules (another cut between the same hosts stays in force). Idempotent. */
  heal(): Promise<void>;
}

/** A way in from the root namespace to a port inside a host (see {@link NetnsLab.forward}). */
export interface LabGateway {
  /** `127.0.0.1:<port>`: connections to it are carried to the host's address and port. */
  readonly address: string;
  readonly port: number;
  /** The AF_UNIX socket the relay inside the host listens on (shared across namespaces). */
  readonly socketPath: string;
  /** Stops listening, closes the relay's connections and ends the relay. Idempotent. */
  close(): Promise<void>;
}

/** Hosts in network namespaces on one bridge: see {@link createNetnsLab}. */
export interface NetnsLab {
  /** `iof-<pid>-<rand>`: every namespace of the lab starts with it. */
  readonly id: string;
  readonly hosts: readonly string[];
  /** "10.231.x.0/24". */
  readonly subnet: string;
  /** The host's IPv4 address ("10.231.x.1" for the first host). @throws Error for an unknown host */
  addressOf(host: string): string;
  /** The host's namespace name. */
  namespaceOf(host: string): string;
  /** The argv prefix that runs a command inside the host: `["ip", "netns", "exec", <ns>]`. */
  exec(host: string): string[];
  /** Cuts a and b apart, both directions (the switch drops every frame between their ports). */
  partition(a: string, b: string): Promise<LabCut>;
  /** Cuts the host from every other host. */
  isolate(host: string): Promise<LabCut>;
  /** Heals every cut. */
  heal(): Promise<void>;
  /** The lab in a few lines: namespaces, addresses, the cuts in force, the filter used. */
  describe(): string;
  /**
   * A gateway from the root namespace to `port` on the host's address: a relay process started
   * inside the host (`ip netns exec`) listens on a unix socket in the lab's directory and connects
   * to the service; a listener on 127.0.0.1 in this process connects each client to that socket.
   * Nothing is routed between the namespaces.
   */
  forward(host: string, port: number): Promise<LabGateway>;
  /**
   * Ends the relays, kills what still runs inside the lab's namespaces (by PID), deletes the
   * namespaces (their veths go with them) and the lab's directory. Idempotent.
   */
  destroy(): Promise<void>;
}

const PREFIX = "iof";
const HOST_NAME = /^[a-z0-9][a-z0-9-]{0,15}$/;
const LAB_NAME = /^iof-(\d+)-([0-9a-z]+)-([a-z0-9][a-z0-9-]*)$/;

/** Runs a command, resolving with its stdout; rejects with its stderr in the message. */
function run(argv: readonly string[], timeoutMs = 10_000): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(argv[0]!, argv.slice(1), { timeout: timeoutMs, encoding: "utf8" }, (err, stdout, stderr) => {
      if (err !== null) reject(new Error(`${argv.join(" ")}: ${stderr.trim() || err.message}`, { cause: err }));
      else resolve(stdout);
    });
  });
}

/** The namespaces `ip netns list` shows (names only). */
async function listNamespaces(): Promise<string[]> {
  const out = await run(["ip", "netns", "list"]);
  return out
    .split("\n")
    .map((l) => l.trim().split(/\s+/)[0] ?? "")
    .filter((n) => n !== "");
}

/**
 * Whether network namespaces can be made here: root, `ip` (iproute2) on the PATH, and a kernel
 * that makes a namespace and a bridge in it (tried, then removed).
 */
export async function netnsAvailable(): Promise<NetnsAvailability> {
  const uid = process.getuid?.();
  if (uid !== 0) {
    return {
      available: false,
      notRoot: true,
      reason: `not root (uid ${String(uid)}): network namespaces, veths and bridges need CAP_SYS_ADMIN and CAP_NET_ADMIN`,
    };
  }
  try {
    await run(["ip", "-V"]);
  } catch (err) {
    return { available: false, notRoot: false, reason: `no \`ip\` (iproute2) on the PATH: apt-get install -y iproute2 (${(err as Error).message})` };
  }
  const probe = `${PREFIX}-${process.pid}-probe-x`;
  try {
    await run(["ip", "netns", "add", probe]);
    await run(["ip", "-n", probe, "link", "add", "br0", "type", "bridge"]);
    return { available: true };
  } catch (err) {
    return { available: false, notRoot: false, reason: `no network namespace support: ${(err as Error).message}` };
  } finally {
    await run(["ip", "netns", "del", probe]).catch(() => undefined);
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

/** SIGKILL, by PID, to whatever still runs inside namespace `ns` (processes a lab's user started there). */
async function killInside(ns: string): Promise<void> {
  const pids = await run(["ip", "netns", "pids", ns]).catch(() => "");
  for (const p of pids.split("\n").map((l) => Number(l.trim()))) {
    if (Number.isInteger(p) && p > 1 && p !== process.pid) {
      try {
        process.kill(p, "SIGKILL");
      } catch {
        // gone already
      }
    }
  }
}

/**
 * Removes the namespaces of labs whose process is dead (a run that was killed before its
 * `destroy`): `iof-<pid>-…` with no process `pid`, and their directories in the temp dir. Returns
 * the namespaces removed.
 */
export async function destroyStaleLabs(): Promise<string[]> {
  const removed: string[] = [];
  for (const ns of await listNamespaces().catch(() => [])) {
    const m = LAB_NAME.exec(ns);
    if (m === null || m[2] === "probe") continue;
    if (alive(Number(m[1]))) continue;
    await killInside(ns);
    await run(["ip", "netns", "del", ns]).catch(() => undefined);
    removed.push(ns);
  }
  for (const entry of readdirSync(tmpdir())) {
    const m = /^iof-(\d+)-[0-9a-z]+-[A-Za-z0-9]{6}$/.exec(entry);
    if (m !== null && !alive(Number(m[1]))) rmSync(join(tmpdir(), entry), { recursive: true, force: true });
  }
  return removed;
}

/** Third octets of 10.231.x.0/24 in use: by the root namespace's addresses and by other labs. */
async function usedSubnets(): Promise<Set<number>> {
  const used = new Set<number>();
  const scan = (text: string) => {
    for (const m of text.matchAll(/inet 10\.231\.(\d+)\./g)) used.add(Number(m[1]));
  };
  scan(await run(["ip", "-4", "-o", "addr", "show"]).catch(() => ""));
  for (const ns of await listNamespaces().catch(() => [])) {
    if (ns.startsWith(`${PREFIX}-`)) scan(await run(["ip", "-n", ns, "-4", "-o", "addr", "show"]).catch(() => ""));
  }
  return used;
}

/** The relay a gateway starts inside a host: unix socket (argv[1]) → host (argv[2]) : port (argv[3]). */
const RELAY_SOURCE = `
const net = require("node:net");
const [path, host, port] = process.argv.slice(1);
const server = net.createServer({ noDelay: true }, (client) => {
  const upstream = net.connect({ host, port: Number(port), noDelay: true });
  const end = () => { client.destroy(); upstream.destroy(); };
  client.on("error", end); upstream.on("error", end);
  client.on("close", end); upstream.on("close", end);
  client.pipe(upstream); upstream.pipe(client);
});
server.listen(path, () => process.stdout.write("listening\\n"));
process.on("SIGTERM", () => process.exit(0));
`;

/**
 * Makes a lab: a switch namespace `iof-<pid>-<rand>-sw` with a bridge, and per host a namespace
 * `iof-<pid>-<rand>-<host>` with `lo` up and `eth0` (a veth whose peer is a port of the bridge)
 * holding 10.231.x.(i+1)/24. Partitions are ebtables rules in the switch (iptables rules in the
 * hosts when ebtables does not work there). On failure what was made is removed.
 * @throws Error when a host name is invalid or repeated, or a command fails (its stderr in the message)
 * @example
 * const lab = await createNetnsLab({ hosts: ["n0", "n1", "n2"] });
 * spawn(lab.exec("n0")[0], [...lab.exec("n0").slice(1), "nats-server", "-a", lab.addressOf("n0")]);
 * const cut = await lab.isolate("n2"); … await cut.heal();
 * await lab.destroy();
 */
export async function createNetnsLab(options: NetnsLabOptions): Promise<NetnsLab> {
  const hosts = [...options.hosts];
  const timeoutMs = options.commandTimeoutMs ?? 10_000;
  if (hosts.length === 0 || hosts.length > 250) throw new RangeError(`a lab has 1..250 hosts, got ${hosts.length}`);
  for (const h of hosts)
    if (!HOST_NAME.test(h) || h === "sw") throw new Error(`invalid host name "${h}": lower-case letters, digits, dashes, ≤ 16 characters, not "sw"`);
  if (new Set(hosts).size !== hosts.length) throw new Error(`host names repeat: ${hosts.join(", ")}`);
  await destroyStaleLabs();

  let octet = options.subnet;
  if (octet === undefined) {
    const used = await usedSubnets();
    const start = 1 + Math.floor(Math.random() * 254);
    for (let k = 0; k < 254 && octet === undefined; k++) {
      const x = 1 + ((start - 1 + k) % 254);
      if (!used.has(x)) octet = x;
    }
    if (octet === undefined) throw new Error("every 10.231.x.0/24 is in use");
  }
  if (!(Number.isInteger(octet) && octet >= 1 && octet <= 254)) throw new RangeError(`subnet must be 1..254, got ${octet}`);

  const id = `${PREFIX}-${process.pid}-${Math.random().toString(36).slice(2, 7)}`;
  const sw = `${id}-sw`;
  const nsOf = new Map(hosts.map((h) => [h, `${id}-${h}`]));
  const index = new Map(hosts.map((h, i) => [h, i]));
  const made: string[] = [];
  const relays = new Set<ChildProcess>();
  const gateways = new Set<LabGateway>();
  const cuts = new Map<number, { description: string; rules: string[][] }>();
  let nextCut = 1;
  let filter: "ebtables" | "iptables" = "ebtables";
  const dir = mkdtempSync(join(tmpdir(), `${id}-`));
  // One filter command at a time: concurrent ebtables/iptables invocations race for their lock.
  let queue: Promise<unknown> = Promise.resolve();
  const serial = <T>(f: () => Promise<T>): Promise<T> => {
    const p = queue.then(f, f);
    queue = p.catch(() => undefined);
    return p;
  };
  const sh = (argv: string[]) => run(argv, timeoutMs);

  const host = (h: string): { ns: string; i: number } => {
    const ns = nsOf.get(h);
    if (ns === undefined) throw new Error(`no host "${h}" in lab ${id} (${hosts.join(", ")})`);
    return { ns, i: index.get(h)! };
  };
  const addressOf = (h: string) => `10.231.${octet}.${host(h).i + 1}`;
  const port = (h: string) => `p${host(h).i}`;

  let destroyed: Promise<void> | undefined;
  const destroy = (): Promise<void> => {
    destroyed ??= (async () => {
      await Promise.all([...gateways].map((g) => g.close()));
      for (const r of relays) r.kill("SIGKILL");
      for (const ns of [...made].reverse()) {
        await killInside(ns);
        await run(["ip", "netns", "del", ns]).catch(() => undefined);
      }
      rmSync(dir, { recursive: true, force: true });
    })();
    return destroyed;
  };
  // A lab must not outlive its process: relays killed, namespaces removed (synchronously, at exit).
  const onExit = () => {
    for (const r of relays) r.kill("SIGKILL");
  };
  process.once("exit", onExit);

  try {
    await sh(["ip", "netns", "add", sw]);
    made.push(sw);
    await sh(["ip", "-n", sw, "link", "set", "lo", "up"]);
    await sh(["ip", "-n", sw, "link", "add", "br0", "type", "bridge"]);
    await sh(["ip", "-n", sw, "link", "set", "br0", "up"]);
    for (const h of hosts) {
      const { ns } = host(h);
      await sh(["ip", "netns", "add", ns]);
      made.push(ns);
      await sh(["ip", "-n", ns, "link", "set", "lo", "up"]);
      // Made inside the switch, one end moved straight into the host: the root namespace never holds either.
      await sh(["ip", "-n", sw, "link", "add", port(h), "type", "veth", "peer", "name", "eth0", "netns", ns]);
      await sh(["ip", "-n", sw, "link", "set", port(h), "master", "br0", "up"]);
      await sh(["ip", "-n", ns, "addr", "add", `${addressOf(h)}/24`, "dev", "eth0"]);
      await sh(["ip", "-n", ns, "link", "set", "eth0", "up"]);
    }
    try {
      await sh(["ip", "netns", "exec", sw, "ebtables", "-L", "FORWARD"]);
    } catch {
      filter = "iptables";
      await sh(["ip", "netns", "exec", host(hosts[0]!).ns, "iptables", "-L", "INPUT"]);
    }
  } catch (err) {
    await destroy();
    throw err;
  }

  /** The rules that cut a from b (b undefined: from everyone), in the filter in use. */
  const rulesOf = (a: string, b: string | undefined): string[][] => {
    if (filter === "ebtables") {
      const pa = port(a);
      if (b === undefined)
        return [
          ["-A", "FORWARD", "-i", pa, "-j", "DROP"],
          ["-A", "FORWARD", "-o", pa, "-j", "DROP"],
        ].map((r) => ["ip", "netns", "exec", sw, "ebtables", ...r]);
      const pb = port(b);
      return [
        ["-A", "FORWARD", "-i", pa, "-o", pb, "-j", "DROP"],
        ["-A", "FORWARD", "-i", pb, "-o", pa, "-j", "DROP"],
      ].map((r) => ["ip", "netns", "exec", sw, "ebtables", ...r]);
    }
    const inHost = (h: string, r: string[]) => ["ip", "netns", "exec", host(h).ns, "iptables", ...r];
    if (b === undefined) return [inHost(a, ["-A", "INPUT", "-i", "eth0", "-j", "DROP"]), inHost(a, ["-A", "OUTPUT", "-o", "eth0", "-j", "DROP"])];
    return [
      inHost(a, ["-A", "INPUT", "-s", addressOf(b), "-j", "DROP"]),
      inHost(a, ["-A", "OUTPUT", "-d", addressOf(b), "-j", "DROP"]),
      inHost(b, ["-A", "INPUT", "-s", addressOf(a), "-j", "DROP"]),
      inHost(b, ["-A", "OUTPUT", "-d", addressOf(a), "-j", "DROP"]),
    ];
  };
  const cut = async (description: string, rules: string[][]): Promise<LabCut> => {
    if (destroyed !== undefined) throw new Error(`lab ${id} was destroyed`);
    const n = nextCut++;
    cuts.set(n, { description, rules });
    await serial(async () => {
      for (const r of rules) await sh(r);
    });
    return {
      description,
      heal: async () => {
        if (!cuts.delete(n) || destroyed !== undefined) return;
        // -D removes one copy of the rule: a second cut between the same hosts keeps its own.
        await serial(async () => {
          for (const r of rules) await sh(r.map((w) => (w === "-A" ? "-D" : w)));
        });
      },
    };
  };

  const lab: NetnsLab = {
    id,
    hosts,
    subnet: `10.231.${octet}.0/24`,
    addressOf,
    namespaceOf: (h) => host(h).ns,
    exec: (h) => ["ip", "netns", "exec", host(h).ns],
    partition: (a, b) => {
      if (host(a).i === host(b).i) throw new Error(`cannot partition ${a} from itself`);
      return cut(`${a} ⇹ ${b}`, rulesOf(a, b));
    },
    isolate: (h) => cut(`${h} isolated`, rulesOf(h, undefined)),
    async heal() {
      if (destroyed !== undefined) return;
      cuts.clear();
      await serial(async () => {
        if (filter === "ebtables") await sh(["ip", "netns", "exec", sw, "ebtables", "-F", "FORWARD"]);
        else for (const h of hosts) for (const c of ["INPUT", "OUTPUT"]) await sh(["ip", "netns", "exec", host(h).ns, "iptables", "-F", c]);
      });
    },
    describe() {
      const lines = [`lab ${id}: switch ${sw} (bridge br0), ${lab.subnet}, partitions by ${filter}`];
      for (const h of hosts) lines.push(`  ${h}: ${host(h).ns} eth0 ${addressOf(h)} ↔ ${sw} ${port(h)}`);
      const now = [...cuts.values()].map((c) => c.description);
      lines.push(`  cuts: ${now.length === 0 ? "none" : now.join(", ")}`);
      return lines.join("\n");
    },
    async forward(h, targetPort) {
      if (destroyed !== undefined) throw new Error(`lab ${id} was destroyed`);
      const socketPath = join(dir, `${h}-${targetPort}-${gateways.size}.sock`);
      const relay = spawn("ip", ["netns", "exec", host(h).ns, process.execPath, "-e", RELAY_SOURCE, socketPath, addressOf(h), String(targetPort)], {
        stdio: ["ignore", "pipe", "pipe"],
      });
      relays.add(relay);
      relay.once("exit", () => relays.delete(relay));
      let errText = "";
      relay.stderr.on("data", (d: Buffer) => (errText += d.toString()));
      await new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`relay into ${h}:${targetPort} did not listen in ${timeoutMs} ms: ${errText}`)), timeoutMs);
        relay.stdout.once("data", () => {
          clearTimeout(timer);
          resolve();
        });
        relay.once("exit", (code) => {
          clearTimeout(timer);
          reject(new Error(`relay into ${h}:${targetPort} exited (${String(code)}): ${errText}`));
        });
      }).catch((err: unknown) => {
        relay.kill("SIGKILL");
        throw err;
      });
      const sockets = new Set<Socket>();
      // A relay adds no delay of its own: small NATS and HTTP/2 frames go out at once (no Nagle).
      const server: Server = createServer({ noDelay: true }, (client) => {
        const upstream = connect({ path: socketPath });
        sockets.add(client).add(upstream);
        const end = () => {
          client.destroy();
          upstream.destroy();
          sockets.delete(client);
          sockets.delete(upstream);
        };
        for (const s of [client, upstream]) {
          s.on("error", end);
          s.on("close", end);
        }
        client.pipe(upstream);
        upstream.pipe(client);
      });
      await new Promise<void>((resolve, reject) => {
        server.once("error", reject);
        server.listen(0, "127.0.0.1", () => resolve());
      });
      const p = (server.address() as { port: number }).port;
      let closing: Promise<void> | undefined;
      const gateway: LabGateway = {
        address: `127.0.0.1:${p}`,
        port: p,
        socketPath,
        close() {
          closing ??= new Promise<void>((resolve) => {
            gateways.delete(gateway);
            for (const s of sockets) s.destroy();
            relay.kill("SIGTERM");
            server.close(() => resolve());
          });
          return closing;
        },
      };
      gateways.add(gateway);
      return gateway;
    },
    async destroy() {
      process.removeListener("exit", onExit);
      await destroy();
    },
  };
  return lab;
}

/**
 * Whether a TCP connection from inside host `from` to `address:port` gets an answer (accepted or
 * refused: the peer's kernel answered) within 2 s; a partitioned peer never answers. What the
 * lab's tests probe a partition with.
 */
export function labReaches(lab: NetnsLab, from: string, address: string, port: number): Promise<boolean> {
  const probe = `const s = require("node:net").connect({ host: process.argv[1], port: Number(process.argv[2]) });
s.on("connect", () => process.exit(0));
s.on("error", (e) => process.exit(e.code === "ECONNREFUSED" ? 0 : 1));
setTimeout(() => process.exit(1), 2000);`;
  const [cmd, ...args] = lab.exec(from);
  return new Promise((resolve, reject) => {
    const child = spawn(cmd!, [...args, process.execPath, "-e", probe, address, String(port)], { stdio: "ignore" });
    const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
    child.once("error", reject);
    child.once("exit", (code) => {
      clearTimeout(timer);
      resolve(code === 0);
    });
  });
}

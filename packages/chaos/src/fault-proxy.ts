import { connect, createServer, type Server, type Socket } from "node:net";
import { createPrng, type Prng } from "./prng.js";

/** Options of {@link startFaultProxy}. */
export interface FaultProxyOptions {
  /** Where the proxy listens, `host:port` on loopback. @default "127.0.0.1:0" (an ephemeral port) */
  readonly listen?: string;
  /** Where it forwards to, `host:port` on loopback ("127.0.0.1:4222", "[::1]:50051"). */
  readonly target: string;
  /** Seed of the jitter and drop decisions. @default 1 */
  readonly seed?: number;
}

/** What to do with the connections that exist when a partition starts. */
export type PartitionMode = "stall" | "reset";

/** Counters of a {@link FaultProxy}. */
export interface FaultProxyStats {
  /** Connections accepted since the start. */
  readonly accepted: number;
  /** Connections open now (forwarding, stalled or held). */
  readonly active: number;
  /** Connections held unconnected now by a partition. */
  readonly held: number;
  /** Connections reset by drop decisions. */
  readonly dropped: number;
  /** Connections reset by `partition(true, { existing: "reset" })`. */
  readonly partitionResets: number;
  /** Connections closed because the target refused or failed them. */
  readonly upstreamFailures: number;
  /** Chunks (either direction) held back by a latency fault before being forwarded. */
  readonly delayed: number;
  readonly bytesToTarget: number;
  readonly bytesToClient: number;
}

/**
 * A TCP fault proxy between a service and NATS or one of its gRPC peers: it forwards bytes both ways
 * and injects network faults. It works below the protocol (NATS' text protocol and gRPC's HTTP/2
 * pass as opaque bytes, in order). Loopback only.
 *
 * Faults:
 * - **latency**: each chunk, in each direction, is delayed by `ms` plus up to `jitterMs` (uniform,
 *   seeded); order is kept (a chunk never overtakes the one before it), so a round trip costs twice.
 * - **drop**: each chunk, in either direction, resets its connection (RST both ways) with the
 *   given probability. Dropping bytes while keeping a connection would break TCP's promise of an
 *   ordered, complete stream, which no real network does; losing a connection is what a client
 *   sees from a lossy or flapping link.
 * - **partition**: no new connection gets through — it is accepted and held with nothing read
 *   and nothing connected upstream, as a SYN that goes unanswered; when the partition heals, a held
 *   connection the client still keeps is connected to the target (a retransmitted SYN getting
 *   through). Existing connections are either stalled (`"stall"`, the default: nothing read or
 *   delivered either way, bytes wait in the kernel buffers and flow again on heal, as TCP's
 *   retransmission delivers them after a short partition — the peers' own keep-alives decide
 *   whether they give up) or reset (`"reset"`: RST both ways, as after a long one).
 */
export interface FaultProxy {
  /** `host:port` it listens on (the port chosen when listening on port 0). */
  readonly address: string;
  readonly host: string;
  readonly port: number;
  /** Delays every chunk by `ms` + up to `jitterMs` in each direction (0, 0: no delay). */
  setLatency(ms: number, jitterMs?: number): void;
  /** Resets a connection with probability `probability` per chunk forwarded (0: never). */
  setDrop(probability: number): void;
  /** Starts (true) or heals (false) a partition; `existing` says what happens to open connections. */
  partition(on: boolean, options?: { readonly existing?: PartitionMode }): void;
  /** Removes every fault: no latency, no drop, partition healed. */
  reset(): void;
  stats(): FaultProxyStats;
  /** Stops listening and destroys every connection and timer. Idempotent. */
  close(): Promise<void>;
}

/** Buffered bytes of one direction above which its source stops being read (latency queues). */
const HIGH_WATER = 1 << 20;

/**
 * Starts a fault proxy on loopback and resolves once it listens.
 * @throws Error when `listen` or `target` is not a loopback `host:port` (the proxy never reaches
 *   another machine), or listening fails
 * @example
 * const proxy = await startFaultProxy({ target: `127.0.0.1:${nats.port}` });
 * const nc = await connect({ servers: `nats://${proxy.address}` });
 * proxy.partition(true);  // … the service's NATS link is cut
 * proxy.partition(false); // healed
 * await proxy.close();
 */
export async function startFaultProxy(options: FaultProxyOptions): Promise<FaultProxy> {
  const listen = parseLoopback(options.listen ?? "127.0.0.1:0", "listen");
  const target = parseLoopback(options.target, "target");
  const rng = createPrng(options.seed ?? 1);
  const state: ProxyState = { latencyMs: 0, jitterMs: 0, drop: 0, partitioned: false, closed: false, rng };
  const counters = { accepted: 0, dropped: 0, partitionResets: 0, upstreamFailures: 0, delayed: 0, bytesToTarget: 0, bytesToClient: 0 };
  const links = new Set<Link>();
  const held = new Set<Socket>();

  const open = (client: Socket): void => {
    const upstream = connect({ host: target.host, port: target.port, allowHalfOpen: true });
    const link = new Link(client, upstream, state, counters, () => links.delete(link));
    links.add(link);
    if (state.partitioned) link.stall(); // a partition began while it was held or connecting
  };

  const server: Server = createServer({ allowHalfOpen: true, pauseOnConnect: true }, (client) => {
    counters.accepted++;
    client.on("error", () => undefined); // a reset client is only a closed connection
    if (state.closed) {
      client.destroy();
      return;
    }
    if (state.partitioned) {
      held.add(client);
      client.once("close", () => held.delete(client));
      return;
    }
    open(client);
  });

  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(listen.port, listen.host, () => {
      server.off("error", reject);
      resolve();
    });
  });
  const bound = server.address();
  const port = typeof bound === "object" && bound !== null ? bound.port : listen.port;
  const hostText = listen.host.includes(":") ? `[${listen.host}]` : listen.host;
  let closing: Promise<void> | undefined;

  const heal = (): void => {
    state.partitioned = false;
    for (const client of [...held]) {
      held.delete(client);
      if (!client.destroyed) open(client);
    }
    for (const link of links) link.unstall();
  };

  return {
    address: `${hostText}:${port}`,
    host: listen.host,
    port,
    setLatency(ms, jitterMs = 0) {
      if (!(ms >= 0) || !(jitterMs >= 0)) throw new RangeError(`latency ${ms} ms, jitter ${jitterMs} ms: both must be ≥ 0`);
      state.latencyMs = ms;
      state.jitterMs = jitterMs;
    },
    setDrop(probability) {
      if (!(probability >= 0 && probability <= 1)) throw new RangeError(`drop probability ${probability} is outside [0, 1]`);
      state.drop = probability;
    },
    partition(on, partitionOptions = {}) {
      if (!on) {
        heal();
        return;
      }
      state.partitioned = true;
      for (const link of [...links]) {
        if ((partitionOptions.existing ?? "stall") === "reset") {
          counters.partitionResets++;
          link.reset();
        } else link.stall();
      }
    },
    reset() {
      state.latencyMs = 0;
      state.jitterMs = 0;
      state.drop = 0;
      heal();
    },
    stats() {
      return { ...counters, active: links.size + held.size, held: held.size };
    },
    close() {
      closing ??= new Promise<void>((resolve) => {
        state.closed = true;
        server.close(() => resolve());
        for (const link of [...links]) link.destroy();
        for (const client of held) client.destroy();
        held.clear();
      });
      return closing;
    },
  };
}

interface ProxyState {
  latencyMs: number;
  jitterMs: number;
  drop: number;
  partitioned: boolean;
  closed: boolean;
  readonly rng: Prng;
}

interface Counters {
  dropped: number;
  upstreamFailures: number;
  delayed: number;
  bytesToTarget: number;
  bytesToClient: number;
}

/** One proxied connection: a client socket, its upstream socket, and a pipe each way. */
class Link {
  stalled = false;
  private done = false;
  private readonly up: Pipe;
  private readonly down: Pipe;

  constructor(
    readonly client: Socket,
    readonly upstream: Socket,
    private readonly state: ProxyState,
    private readonly counters: Counters,
    private readonly onDone: () => void,
  ) {
    this.up = new Pipe(this, client, upstream, (n) => (counters.bytesToTarget += n));
    this.down = new Pipe(this, upstream, client, (n) => (counters.bytesToClient += n));
    let connected = false;
    upstream.once("connect", () => {
      connected = true;
      if (!this.stalled) client.resume();
    });
    upstream.on("error", () => {
      if (!connected) counters.upstreamFailures++;
      this.reset();
    });
    client.on("error", () => this.reset());
    const settle = () => {
      if (client.destroyed && upstream.destroyed) this.finish();
    };
    client.on("close", settle);
    upstream.on("close", settle);
  }

  /** The delay of the next chunk (0 when there is no latency fault). */
  delay(): number {
    const { latencyMs, jitterMs, rng } = this.state;
    if (latencyMs === 0 && jitterMs === 0) return 0;
    this.counters.delayed++;
    return latencyMs + (jitterMs === 0 ? 0 : rng.next() * jitterMs);
  }

  /** A drop decision for one chunk: true resets the link. */
  dropNow(): boolean {
    if (this.state.drop === 0 || !this.state.rng.chance(this.state.drop)) return false;
    this.counters.dropped++;
    this.reset();
    return true;
  }

  stall(): void {
    this.stalled = true;
    this.client.pause();
    this.upstream.pause();
  }

  unstall(): void {
    if (!this.stalled) return;
    this.stalled = false;
    this.up.resume();
    this.down.resume();
  }

  /** RST both ways. */
  reset(): void {
    this.finishTimers();
    if (!this.client.destroyed) this.client.resetAndDestroy();
    if (!this.upstream.destroyed) this.upstream.resetAndDestroy();
  }

  destroy(): void {
    this.finishTimers();
    this.client.destroy();
    this.upstream.destroy();
  }

  private finishTimers(): void {
    this.up.clear();
    this.down.clear();
  }

  private finish(): void {
    if (this.done) return;
    this.done = true;
    this.finishTimers();
    this.onDone();
  }
}

/** One direction of a link: reads `src`, applies drop and latency, writes `dst` in order. */
class Pipe {
  private readonly queue: Array<{ chunk: Buffer; due: number }> = [];
  private queued = 0;
  private lastDue = 0;
  private timer: NodeJS.Timeout | undefined;
  private ended = false;
  private waitingDrain = false;

  constructor(
    private readonly link: Link,
    private readonly src: Socket,
    private readonly dst: Socket,
    private readonly count: (n: number) => void,
  ) {
    src.on("data", (chunk: Buffer) => this.push(chunk));
    src.on("end", () => {
      this.ended = true;
      this.flush();
    });
  }

  resume(): void {
    if (this.queued < HIGH_WATER && !this.waitingDrain) this.src.resume();
    this.flush();
  }

  clear(): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
    this.queue.length = 0;
    this.queued = 0;
  }

  private push(chunk: Buffer): void {
    if (this.link.dropNow()) return;
    const delay = this.link.delay();
    if (delay === 0 && this.queue.length === 0 && !this.link.stalled) {
      this.write(chunk);
      return;
    }
    // Never before the chunk ahead of it: jitter must not reorder a byte stream.
    const due = Math.max(this.lastDue, performance.now() + delay);
    this.lastDue = due;
    this.queue.push({ chunk, due });
    this.queued += chunk.length;
    if (this.queued >= HIGH_WATER) this.src.pause();
    this.schedule();
  }

  private schedule(): void {
    if (this.timer !== undefined || this.link.stalled || this.queue.length === 0) return;
    this.timer = setTimeout(
      () => {
        this.timer = undefined;
        this.flush();
      },
      Math.max(0, this.queue[0]!.due - performance.now()),
    );
  }

  private flush(): void {
    if (this.link.stalled) return;
    const now = performance.now();
    while (this.queue.length > 0 && this.queue[0]!.due <= now + 0.5) {
      const { chunk } = this.queue.shift()!;
      this.queued -= chunk.length;
      this.write(chunk);
    }
    if (this.queued < HIGH_WATER && !this.waitingDrain && !this.src.destroyed) this.src.resume();
    if (this.ended && this.queue.length === 0 && !this.dst.destroyed) this.dst.end();
    this.schedule();
  }

  private write(chunk: Buffer): void {
    if (this.dst.destroyed) return;
    this.count(chunk.length);
    if (this.dst.write(chunk)) return;
    this.waitingDrain = true;
    this.src.pause();
    this.dst.once("drain", () => {
      this.waitingDrain = false;
      if (!this.link.stalled) this.resume();
    });
  }
}

/** Parses `host:port` and refuses anything off loopback. */
function parseLoopback(text: string, what: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(text);
  const host = m?.[1] ?? m?.[2];
  const port = Number(m?.[3]);
  if (host === undefined || !Number.isInteger(port) || port < 0 || port > 65535) throw new Error(`${what} "${text}" is not host:port`);
  if (!isLoopback(host))
    throw new Error(`${what} "${text}" is not a loopback address: the fault proxy only forwards within this machine (127.0.0.0/8, ::1, localhost)`);
  return { host, port };
}

function isLoopback(host: string): boolean {
  if (host === "localhost" || host === "::1") return true;
  const octets = /^127\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(host);
  return octets !== null && octets.slice(1).every((o) => Number(o) <= 255);
}

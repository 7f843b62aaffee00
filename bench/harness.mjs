// The benchmark's harness (DESIGN §9: "the benchmark itself never hangs: every wait is bounded,
// and it stops what it started on any exit"; issue 15 item 6):
// - every process a section starts (nats-server, a service, a whole stack) is owned by the section,
//   watched, and stopped when the section ends, however it ends;
// - a watched process that exits on its own fails its section at once, with its exit and the last
//   lines of its output — not a wait that never ends (issue 15: KVM fail-stopped, the bench waited
//   for ten minutes);
// - every section has a deadline, and its waits name what did not happen and what was reached;
// - SIGINT, SIGTERM or a crash of the bench stop everything it started, then any direct child still
//   running (found in /proc), before it exits.
import { existsSync, readdirSync, readFileSync, rmSync } from "node:fs";
import os from "node:os";
import { join } from "node:path";
import { clearInterval, clearTimeout, setInterval } from "node:timers";
import { readState, stackDown, stackUp } from "@ioasid/cli";
import { startNats, startService, waitFor } from "@ioasid/testkit";
import { fmt, now, serviceNodeArgs, withTimeout } from "./util.mjs";

/** What a section reports when it fails: a message that says what did not happen. */
export class SectionFailure extends Error {}

/** Processes and stacks owned by the whole run (the sections' own lists are in here too). */
const owned = new Set();
/** The section running now, told of unhandled rejections and of signals. */
let current;

function alive(pid) {
  if (pid === undefined) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/**
 * The PIDs of this process's direct children still in the process table, from /proc (Linux); the
 * last net that catches what the bookkeeping missed, such as a stack half started by stackUp
 * (detached, in their own session: a Ctrl-C does not reach them).
 */
export function childPids(pid = process.pid) {
  if (!existsSync("/proc")) return [];
  const out = [];
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const stat = readFileSync(`/proc/${name}/stat`, "utf8");
      // pid (comm) state ppid …: comm may hold spaces and parentheses, so parse after the last ')'.
      const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      if (Number(fields[1]) === pid && fields[0] !== "Z") out.push(Number(name));
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

/** Sends `signal` to each PID, ignoring those already gone. */
function signalAll(pids, signal) {
  for (const pid of pids) {
    try {
      process.kill(pid, signal);
    } catch {
      // already gone
    }
  }
}

/**
 * Stops everything: the owned entries (newest first, each bounded by `graceMs`), then any direct
 * child still running: SIGTERM, and SIGKILL after 3 s.
 */
export async function stopEverything(log, graceMs = 10_000) {
  for (const entry of [...owned].reverse()) {
    try {
      await withTimeout(Promise.resolve().then(entry.stop), graceMs, `${entry.what} to stop`);
    } catch (err) {
      log(`  ! ${err.message}`);
      killOwned(entry, log);
    }
    owned.delete(entry);
  }
  let left = childPids();
  if (left.length === 0) return;
  log(`  stopping ${left.length} leftover child process(es): ${left.join(", ")}`);
  signalAll(left, "SIGTERM");
  const deadline = Date.now() + 3000;
  while ((left = childPids()).length > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  signalAll(left, "SIGKILL");
}

/**
 * Installs the run's exit hooks: SIGINT and SIGTERM fail the running section ("interrupted"), stop
 * everything, call `onInterrupt(signal)` (which writes the results) and exit 130 / 143; a second
 * signal kills the children at once. An unhandled rejection or uncaught exception fails the running
 * section instead of ending the run (or is logged, between sections). On exit, any child still
 * running gets SIGKILL.
 */
export function installExitHooks({ log, onInterrupt }) {
  let interrupted = false;
  const onSignal = (signal) => {
    if (interrupted) {
      signalAll(childPids(), "SIGKILL");
      process.exit(signal === "SIGINT" ? 130 : 143);
    }
    interrupted = true;
    log(`\n${signal}: stopping everything the benchmark started`);
    current?.fail(`interrupted by ${signal}`);
    void (async () => {
      try {
        await stopEverything(log, 5000);
        await onInterrupt(signal);
      } finally {
        const left = childPids();
        if (left.length > 0) log(`  ! still running after the stop: ${left.join(", ")} (killed)`);
        process.exit(signal === "SIGINT" ? 130 : 143);
      }
    })();
  };
  process.on("SIGINT", () => onSignal("SIGINT"));
  process.on("SIGTERM", () => onSignal("SIGTERM"));
  const stray = (kind) => (err) => {
    const message = `${kind}: ${err instanceof Error ? err.message : String(err)}`;
    if (current !== undefined) current.fail(message);
    else log(`  ! ${message} (between sections; ignored)`);
  };
  process.on("unhandledRejection", stray("unhandled rejection"));
  process.on("uncaughtException", stray("uncaught exception"));
  process.on("exit", () => signalAll(childPids(), "SIGKILL"));
}

/** The last `n` lines of a text, indented, for a failure message. */
function tail(text, n = 12) {
  return text
    .trimEnd()
    .split("\n")
    .slice(-n)
    .map((l) => `      ${l}`)
    .join("\n");
}

/**
 * One section's scope: its deadline, its phase, what it owns, and the context its function gets.
 * `fail(message)` ends the section (first failure wins).
 */
class SectionScope {
  constructor(name, { log, timeoutMs }) {
    this.name = name;
    this.log = log;
    this.controller = new AbortController();
    this.resources = [];
    this.phaseName = "starting";
    this.progress = undefined;
    this.timer = setTimeout(() => this.fail(`did not finish within ${fmt(timeoutMs / 1000)} s`), timeoutMs);
    this.failed = new Promise((_, reject) => this.controller.signal.addEventListener("abort", () => reject(this.controller.signal.reason), { once: true }));
    this.failed.catch(() => undefined);
  }

  /** Where the section is: `phase "…" (reached: …)`. */
  where() {
    const reached = this.progress === undefined ? "" : ` (reached: ${safe(this.progress)})`;
    return `in phase "${this.phaseName}"${reached}`;
  }

  fail(message) {
    if (this.controller.signal.aborted) return;
    this.controller.abort(new SectionFailure(`${message}, ${this.where()}`));
  }

  /**
   * Owns `stop` until the section ends (or until the returned function is called); `kill`, when
   * given, is called if `stop` does not finish in time (what it started is not the bench's child).
   */
  own(what, stop, kill) {
    const entry = { what, stop, kill };
    owned.add(entry);
    this.resources.push(entry);
    return () => {
      owned.delete(entry);
      this.resources = this.resources.filter((e) => e !== entry);
    };
  }

  async stopResources() {
    clearTimeout(this.timer);
    for (const entry of [...this.resources].reverse()) {
      try {
        await withTimeout(Promise.resolve().then(entry.stop), 30_000, `${entry.what} to stop`);
      } catch (err) {
        this.log(`  ! ${this.name}: ${err.message}`);
        killOwned(entry, this.log);
      }
      owned.delete(entry);
    }
    this.resources = [];
  }

  /** The context handed to the section's function. */
  context(base) {
    const signal = this.controller.signal;
    return {
      ...base,
      signal,
      /** Names the phase the section is in, and how to say how far it got (for failure messages). */
      phase: (name, progress) => {
        signal.throwIfAborted();
        this.phaseName = name;
        this.progress = progress;
      },
      /** Awaits a condition, bounded: fails with what did not happen and what was reached. */
      waitFor: async (condition, { timeoutMs, what, intervalMs = 10, progress }) => {
        try {
          await waitFor(condition, { timeoutMs, intervalMs, message: what, signal });
        } catch (err) {
          if (signal.aborted) throw signal.reason;
          throw new SectionFailure(`${err.message}${progress === undefined ? "" : `; reached: ${safe(progress)}`}, ${this.where()}`);
        }
      },
      /** Awaits a promise, bounded (see withTimeout), and no longer than the section. */
      within: (promise, timeoutMs, what, progress) => Promise.race([withTimeout(promise, timeoutMs, what, progress), this.failed]),
      /** Owns anything with a stop function (a connection, a client) until the section ends. */
      own: (what, stop, kill) => this.own(what, stop, kill),
      startNats: (options) => this.startNats(options),
      startService: (options) => this.startService(options),
      stackUp: (options) => this.stackUp(options),
    };
  }

  /** A nats-server (testkit) owned by the section and watched: its death fails the section. */
  async startNats(options) {
    const nats = await startNats(options);
    const release = this.own(`nats-server pid ${nats.pid}`, () => nats.stop());
    const pid = nats.pid;
    const watch = setInterval(() => {
      // The testkit's `pid` reads undefined once its nats-server has exited.
      if (pid !== undefined && (nats.pid === undefined || !alive(pid))) {
        clearInterval(watch);
        this.fail(`nats-server (pid ${pid}, ${nats.url}) exited on its own; its last output:\n${tail(nats.logs?.() ?? "")}`);
      }
    }, 250);
    this.own("nats-server watch", () => clearInterval(watch));
    const stop = nats.stop.bind(nats);
    return Object.assign(Object.create(nats), {
      stop: async () => {
        clearInterval(watch);
        await stop();
        release();
      },
    });
  }

  /**
   * A service process (testkit) owned by the section and watched: an exit the section did not ask
   * for (stop or kill) fails it with the exit status and the last lines of the service's output.
   */
  async startService(options) {
    // The same node options as the whole-stack sections' services (guests.mjs `serviceNodeArgs`):
    // the grpc, delivery and failover sections' own processes are profiled with BENCH_PROFILE=1 too.
    const nodeArgs = [...serviceNodeArgs(this.name), ...(options.nodeArgs ?? [])];
    const proc = await startService(nodeArgs.length === 0 ? options : { ...options, nodeArgs });
    let expected = false;
    this.own(`${options.name} pid ${proc.pid}`, () => {
      expected = true;
      return proc.stop();
    });
    void proc.exited.then((status) => {
      if (!expected)
        this.fail(
          `${options.name} (pid ${proc.pid}) exited on its own with code ${status.code}, signal ${status.signal}; its last output:\n${tail(proc.logs())}`,
        );
    });
    return Object.assign(Object.create(proc), {
      stop: (...args) => {
        expected = true;
        return proc.stop(...args);
      },
      kill: (...args) => {
        expected = true;
        return proc.kill(...args);
      },
    });
  }

  /**
   * The whole stack (`stackUp` of @ioasid/cli: nats-server and the five services, detached) owned
   * by the section, brought down and its directory removed when the section ends; every process is
   * watched by PID and one that dies fails the section with the last lines of its log. Nothing
   * restarts a service here: a service that fail-stops ends the section, it is not waited for.
   */
  async stackUp(options) {
    let state;
    const up = stackUp(options);
    this.own(
      `the stack in ${options.dir}`,
      async () => {
        // A stack still coming up is brought down once stackUp has settled (it kills what it
        // started if it fails); the /proc net of stopEverything covers a bench that cannot wait.
        await up.catch(() => undefined);
        if (existsSync(join(options.dir, "stack.json"))) await stackDown({ dir: options.dir, graceMs: 3000 });
        rmSync(options.dir, { recursive: true, force: true });
      },
      // The stack's processes are detached (not the bench's children): an interrupted bench whose
      // graceful stackDown ran out of time left the core and the IOMMU running. By PID, as `down`.
      () => killStack(options.dir),
    );
    state = await up;
    const procs = [
      { name: "nats-server", pid: state.nats.pid, log: join(options.dir, "logs", "nats-server.log") },
      ...Object.entries(state.services).map(([name, s]) => ({ name, pid: s.pid, log: s.log })),
    ];
    const watch = setInterval(() => {
      for (const p of procs) {
        if (p.pid !== undefined && !alive(p.pid)) {
          clearInterval(watch);
          const log = existsSync(p.log) ? readFileSync(p.log, "utf8") : "(no log)";
          // stackUp keeps no handle on its detached children, so their exit code is not known here;
          // a fail-stop says why in its last log line.
          this.fail(`${p.name} (pid ${p.pid}) of the stack exited on its own (nothing restarts it in the benchmark); the end of ${p.log}:\n${tail(log)}`);
          return;
        }
      }
    }, 250);
    // Registered after the stack's own entry: stopped first, so bringing it down is no failure.
    this.own("stack watch", () => clearInterval(watch));
    return state;
  }
}

/** Calls an owned entry's `kill` (its stop ran out of time), and says what it killed. */
function killOwned(entry, log) {
  if (entry.kill === undefined) return;
  try {
    const killed = entry.kill();
    if (killed?.length > 0) log(`  killed what ${entry.what} had left: ${killed.join(", ")}`);
  } catch (err) {
    log(`  ! could not kill what ${entry.what} had left: ${err.message}`);
  }
}

/** SIGKILL to every process a stack directory's state file records (supervisor first); the PIDs killed. */
function killStack(dir) {
  if (!existsSync(join(dir, "stack.json"))) return [];
  const state = readState(dir);
  const pids = [
    state.supervisor?.pid,
    ...Object.values(state.services).map((s) => s.pid),
    state.standbyCore?.pid,
    ...(state.natsCluster ?? []).map((n) => n.pid),
    state.nats.external ? undefined : state.nats.pid,
  ].filter((pid) => pid !== undefined);
  const killed = [];
  for (const pid of pids) {
    try {
      process.kill(pid, "SIGKILL");
      killed.push(pid);
    } catch {
      // already gone
    }
  }
  return killed;
}

function safe(progress) {
  try {
    return String(progress());
  } catch (err) {
    return `(progress unavailable: ${err.message})`;
  }
}

/**
 * Runs one section: `fn(context)` under the section's deadline, with its processes owned and
 * watched, and records into `sections[name]` its status ("ok", or "failed" with the reason), its
 * duration and the load average at its start and end. Never throws: a failed section is logged
 * and the run goes on with the next one.
 * @param base what every section gets: { quick, log, fmt, results, target, … }
 */
export async function runSection(name, fn, { base, sections, timeoutMs }) {
  const { log } = base;
  const record = { status: "running", startedAt: new Date().toISOString(), loadavgStart: os.loadavg() };
  sections[name] = record;
  const scope = new SectionScope(name, { log, timeoutMs });
  current = scope;
  const t0 = now();
  const run = Promise.resolve().then(() => fn(scope.context(base)));
  run.catch(() => undefined);
  try {
    await Promise.race([run, scope.failed]);
    record.status = "ok";
  } catch (err) {
    record.status = "failed";
    record.reason = err instanceof SectionFailure || scope.controller.signal.aborted ? err.message : `${err?.message ?? err}, ${scope.where()}`;
    log(`  ✗ [${name}] FAILED: ${record.reason}`);
  } finally {
    // Ends the section's loops and waits, stops what it started, then gives its function a moment
    // to unwind (calls to stopped services fail fast) — bounded, it is not waited for beyond that.
    scope.fail("the section ended");
    await scope.stopResources();
    await withTimeout(run, 5000, "the section to unwind").catch(() => undefined);
    current = undefined;
    record.seconds = (now() - t0) / 1000;
    record.loadavgEnd = os.loadavg();
  }
  return record;
}

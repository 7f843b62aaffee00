// Timing, formatting and concurrency helpers of the benchmark (pure: no processes, no I/O except
// startProfile's file). Tested in util.test.mjs.
import { mkdirSync, writeFileSync } from "node:fs";
import { clearTimeout } from "node:timers";
import { fileURLToPath } from "node:url";

/** Monotonic time in ms (fractional). */
export const now = () => Number(process.hrtime.bigint()) / 1e6;

/** A number with thousands separators and `d` decimals: fmt(27469.3) → "27,469". */
export const fmt = (n, d = 0) => n.toLocaleString("en-US", { maximumFractionDigits: d, minimumFractionDigits: d });

/** The p-th percentile of an ascending array (nearest rank below). */
export function percentile(sorted, p) {
  return sorted[Math.min(sorted.length - 1, Math.floor((sorted.length * p) / 100))];
}

/** Sorts a copy ascending and returns its p50 (undefined for an empty array). */
export function median(xs) {
  return xs.length === 0
    ? undefined
    : percentile(
        [...xs].sort((a, b) => a - b),
        50,
      );
}

/** Runs a full garbage collection when node runs with --expose-gc. */
export function gc() {
  if (typeof globalThis.gc === "function") for (let i = 0; i < 3; i++) globalThis.gc();
}

/** Bytes this process holds (heap, array buffers, external). */
export function memory() {
  const m = process.memoryUsage();
  return m.heapUsed + m.arrayBuffers + m.external;
}

/** Deterministic PRNG (mulberry32), so runs are comparable. */
export function prng(seed) {
  return () => {
    seed |= 0;
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * With BENCH_PROFILE=1, records a CPU profile of this process for one phase to
 * bench/results/<name>.cpuprofile (open it in Chrome DevTools); otherwise does nothing. Returns the
 * function that stops it. Services are profiled with BENCH_SERVICE_NODE_ARGS="--cpu-prof --cpu-prof-dir=…".
 */
export async function startProfile(name) {
  if (!process.env.BENCH_PROFILE) return async () => undefined;
  const { Session } = await import("node:inspector/promises");
  const session = new Session();
  session.connect();
  await session.post("Profiler.enable");
  await session.post("Profiler.start");
  return async () => {
    const { profile } = await session.post("Profiler.stop");
    mkdirSync(fileURLToPath(new URL("./results/", import.meta.url)), { recursive: true });
    writeFileSync(fileURLToPath(new URL(`./results/${name}.cpuprofile`, import.meta.url)), JSON.stringify(profile));
    session.disconnect();
  };
}

/**
 * Node options of the services a section starts: BENCH_SERVICE_NODE_ARGS as given (split on
 * spaces); without it, with BENCH_PROFILE=1, a CPU profile of each into
 * bench/results/profiles/<section>/ (one CPU.*.cpuprofile per process, written when it stops).
 */
export function serviceNodeArgs(section, env = process.env) {
  const given = env.BENCH_SERVICE_NODE_ARGS;
  if (given !== undefined) return given.split(" ").filter(Boolean);
  if (!env.BENCH_PROFILE) return [];
  return ["--cpu-prof", `--cpu-prof-dir=${fileURLToPath(new URL(`./results/profiles/${section}/`, import.meta.url))}`];
}

/**
 * Settles like `promise`, or rejects with `timed out after <ms> ms waiting for <what>` (plus
 * `progress()` when given: what was reached) if it has not settled by then. The promise itself is
 * not cancelled: stop what it waits on (the section's resources) to end it.
 */
export function withTimeout(promise, timeoutMs, what, progress) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => {
      const reached = progress === undefined ? "" : `; reached: ${progress()}`;
      reject(new Error(`timed out after ${fmt(timeoutMs)} ms waiting for ${what}${reached}`));
    }, timeoutMs);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/**
 * Runs `fn(i)` for i = 0 … count-1 with at most `concurrency` running at once (bounded
 * concurrency: a thousand guests prepared ten at a time, not all at once). Rejects with the first
 * failure after the running calls have settled; starts nothing new after a failure or once
 * `signal` aborts. Resolves with the results in index order.
 */
export async function pool(count, concurrency, fn, { signal } = {}) {
  const out = new Array(count);
  let next = 0;
  let failure;
  const worker = async () => {
    while (next < count && failure === undefined) {
      if (signal?.aborted) {
        failure ??= { err: signal.reason };
        return;
      }
      const i = next++;
      try {
        out[i] = await fn(i);
      } catch (err) {
        failure ??= { err };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(concurrency, count)) }, worker));
  if (failure !== undefined) throw failure.err;
  return out;
}

/**
 * Calls `fn(attempt)` until it resolves, retrying up to `attempts` times in all when
 * `retryOn(err)` says the failure is worth another try (a DEADLINE_EXCEEDED on a busy machine), after
 * `delayMs` × the attempt number; `onRetry(err, attempt)` is told of each retry. Any other failure,
 * or the last one, is thrown.
 */
export async function retrying(fn, { attempts, retryOn, delayMs = 0, onRetry = () => undefined }) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await fn(attempt);
    } catch (err) {
      if (attempt >= attempts || !retryOn(err)) throw err;
      onRetry(err, attempt);
      if (delayMs > 0) await new Promise((r) => setTimeout(r, delayMs * attempt));
    }
  }
}

/**
 * A count from environment variable `name` (`fallback` when unset): a whole number ≥ `min`, or an
 * error that names the variable and what it holds — not a NaN that quietly skips a section's runs.
 */
export function envCount(name, fallback, min = 1) {
  const raw = process.env[name];
  if (raw === undefined || raw === "") return fallback;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < min) throw new Error(`${name}=${JSON.stringify(raw)}: expected a whole number ≥ ${min}`);
  return n;
}

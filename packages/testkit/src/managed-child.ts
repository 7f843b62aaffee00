import { spawn, type ChildProcess, type SpawnOptions } from "node:child_process";
import { OutputLog } from "./output-log.js";

/** How a child process ended. */
export interface ExitStatus {
  /** Exit code, or null when a signal ended it. */
  readonly code: number | null;
  /** The signal that ended it, or null. */
  readonly signal: NodeJS.Signals | null;
}

/** A child process the testkit started: its output, and a promise of its end. */
export interface ManagedChild {
  readonly child: ChildProcess;
  /** Its stdout and stderr, line by line. */
  readonly output: OutputLog;
  /** Settles once it has exited and its output is fully read; a spawn failure (ENOENT…) rejects. */
  readonly exited: Promise<ExitStatus>;
  /** True until it has exited. */
  running(): boolean;
}

const live = new Set<ChildProcess>();
let hooked = false;

/**
 * Spawns a child whose stdout/stderr are collected, tracked so that a test runner that dies (or a
 * test that forgets its teardown) does not leave it running: every tracked child still alive when
 * this process exits gets SIGKILL, by PID.
 */
export function spawnManaged(command: string, args: readonly string[], options: SpawnOptions): ManagedChild {
  if (!hooked) {
    hooked = true;
    process.once("exit", () => {
      for (const c of live) if (c.exitCode === null && c.signalCode === null) c.kill("SIGKILL");
    });
  }
  const child = spawn(command, args, { ...options, stdio: ["ignore", "pipe", "pipe"] });
  const output = new OutputLog();
  if (child.stdout !== null) output.follow(child.stdout, "stdout");
  if (child.stderr !== null) output.follow(child.stderr, "stderr");
  let done = false;
  live.add(child);
  const exited = new Promise<ExitStatus>((resolve, reject) => {
    child.once("error", (err) => {
      // 'error' without a process (spawn failed) is final; after a spawn it is a failed kill().
      if (child.pid === undefined) {
        done = true;
        live.delete(child);
        reject(err);
      }
    });
    // 'close' (not 'exit'): every line the child wrote has been read by then.
    child.once("close", (code, signal) => {
      done = true;
      live.delete(child);
      resolve({ code, signal });
    });
  });
  exited.catch(() => {});
  return { child, output, exited, running: () => !done };
}

/**
 * Sends `signal` to the child (by PID) and waits up to `timeoutMs` for it to exit; then SIGKILL.
 */
export async function terminate(managed: ManagedChild, signal: NodeJS.Signals, timeoutMs: number): Promise<ExitStatus> {
  if (!managed.running()) return managed.exited;
  managed.child.kill(signal);
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<"timeout">((resolve) => {
    timer = setTimeout(() => resolve("timeout"), timeoutMs);
  });
  const first = await Promise.race([managed.exited, timedOut]);
  clearTimeout(timer);
  if (first !== "timeout") return first;
  managed.child.kill("SIGKILL");
  return managed.exited;
}

import { readdirSync, readFileSync } from "node:fs";
import { waitFor } from "./wait-for.js";

// kill(pid, "SIGSTOP") returns once the signal is sent, not once the process stopped: a thread of
// it that was running or just woken may still answer a message that arrives at once. Measured on
// the 2-core machine: right after the call, nats-server was not yet stopped in 116 of 200 tries;
// under load a role-state write was acknowledged 24 ms after nats-server was "stopped"
// (role-state-retry). A test that stops a process and then acts must wait for the kernel.

/**
 * Stops `pid` (SIGSTOP) and resolves once every thread of it is stopped.
 * @param what the process, for the error when it does not stop within 5 s
 */
export async function stopProcess(pid: number, what = `pid ${pid}`): Promise<void> {
  process.kill(pid, "SIGSTOP");
  await untilStopped(pid, true, what);
}

/** Lets `pid` run again (SIGCONT) and resolves once no thread of it is stopped. */
export async function continueProcess(pid: number, what = `pid ${pid}`): Promise<void> {
  process.kill(pid, "SIGCONT");
  await untilStopped(pid, false, what);
}

/**
 * Waits until every thread of `pid` is stopped (`stopped`), or none is, as /proc says (Linux; at
 * once elsewhere, or when the process is gone). Bounded: 5 s, then an error naming what did not happen.
 */
export async function untilStopped(pid: number, stopped: boolean, what: string): Promise<void> {
  if (states(pid) === undefined) return;
  await waitFor(
    () => {
      const s = states(pid);
      if (s === undefined) return true; // exited meanwhile: nothing left to wait for
      return stopped ? s.every((c) => c === "T") : s.every((c) => c !== "T");
    },
    { timeoutMs: 5000, intervalMs: 1, message: `${what} to be ${stopped ? "stopped (SIGSTOP)" : "running again (SIGCONT)"}` },
  );
}

/** The state letter of each thread of `pid` (T: stopped), or undefined without /proc or the process. */
function states(pid: number): string[] | undefined {
  try {
    return readdirSync(`/proc/${pid}/task`).map((tid) => {
      const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, "utf8");
      // "tid (comm) S …": the state follows the last ')' (comm may hold one).
      return stat.charAt(stat.lastIndexOf(")") + 2);
    });
  } catch {
    return undefined;
  }
}

// CPU time of processes by PID, read from /proc (Linux): where a latency's time goes when several
// processes share the machine's CPUs.
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";

let clockTicks;
/** Clock ticks a second of /proc/<pid>/stat's times (`getconf CLK_TCK`; 100 when it cannot be read). */
function ticksPerSecond() {
  if (clockTicks === undefined) {
    try {
      clockTicks = Number(execFileSync("getconf", ["CLK_TCK"], { encoding: "utf8" }).trim()) || 100;
    } catch {
      clockTicks = 100;
    }
  }
  return clockTicks;
}

/**
 * User + system CPU time of process `pid` so far, ms (undefined when it is gone or unreadable).
 * Counted in clock ticks (10 ms at 100 a second): sum many short windows, do not read one.
 */
export function cpuMsOf(pid) {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // Fields after the command name, which is in parentheses and may hold spaces: utime and stime
    // are fields 14 and 15 of the line, 12 and 13 after "pid (comm) ".
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return ((Number(fields[11]) + Number(fields[12])) * 1000) / ticksPerSecond();
  } catch {
    return undefined;
  }
}

/**
 * Accumulates the CPU time `pids` (name → PID) spend inside windows: `start()` before the work,
 * `stop()` after it; `totals()` is the sum over every window per name, and `wallMs` their length.
 */
export function cpuWindows(pids) {
  const sums = new Map([...pids.keys()].map((name) => [name, 0]));
  let open;
  let wallMs = 0;
  const read = () => new Map([...pids].map(([name, pid]) => [name, cpuMsOf(pid)]));
  return {
    start() {
      open = { at: performance.now(), cpu: read() };
    },
    stop() {
      if (open === undefined) return;
      const now = read();
      for (const [name, ms] of now) {
        const before = open.cpu.get(name);
        if (ms !== undefined && before !== undefined) sums.set(name, sums.get(name) + ms - before);
      }
      wallMs += performance.now() - open.at;
      open = undefined;
    },
    totals: () => new Map(sums),
    get wallMs() {
      return wallMs;
    },
  };
}

/**
 * Peak resident set of process `pid` so far (VmHWM in /proc/<pid>/status), MiB; undefined when it
 * is gone or unreadable. What a GC setting that trades memory for CPU costs, read in the same run.
 */
export function peakRssMiBOf(pid) {
  try {
    const m = /^VmHWM:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
    return m === null ? undefined : Number(m[1]) / 1024;
  } catch {
    return undefined;
  }
}

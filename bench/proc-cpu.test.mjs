import { describe, expect, it } from "vitest";
import { cpuMsOf, cpuWindows, peakRssMiBOf } from "./proc-cpu.mjs";

/** Spins until this process has used `ms` more of CPU (by the kernel's own count, getrusage). */
function spin(ms) {
  const start = process.cpuUsage();
  for (;;) {
    const d = process.cpuUsage(start);
    if ((d.user + d.system) / 1000 >= ms) return;
  }
}

describe("proc-cpu", () => {
  it("reads a process's CPU time as the kernel counts it", () => {
    const before = cpuMsOf(process.pid);
    spin(300);
    const after = cpuMsOf(process.pid);
    // The same counters as getrusage, in clock ticks: within two ticks (20 ms) of the 300 ms spun.
    expect(after - before).toBeGreaterThanOrEqual(280);
  });

  it("has no figure for a process that does not exist", () => {
    expect(cpuMsOf(2 ** 22 + 1)).toBeUndefined(); // above Linux's pid_max limit
  });

  it("sums only the windows, per name", () => {
    const w = cpuWindows(new Map([["self", process.pid]]));
    w.start();
    spin(200);
    w.stop();
    spin(300); // outside any window: not counted
    w.start();
    spin(200);
    w.stop();
    const self = w.totals().get("self");
    expect(self).toBeGreaterThanOrEqual(380);
    expect(self).toBeLessThan(680); // would be at least 700 with the work between the windows
    expect(w.wallMs).toBeGreaterThan(0);
  });

  it("reads a process's peak resident set, which holds what it once touched", () => {
    expect(peakRssMiBOf(process.pid)).toBeGreaterThan(10); // a node process is tens of MiB at least
    const residentBefore = process.memoryUsage().rss / 2 ** 20;
    const held = Buffer.alloc(64 * 1024 * 1024, 1); // 64 MiB, every page written
    // The peak is at least what is resident now: what was resident before and the 64 MiB touched.
    expect(peakRssMiBOf(process.pid)).toBeGreaterThanOrEqual(residentBefore + 60);
    expect(held[held.length - 1]).toBe(1);
    expect(peakRssMiBOf(2 ** 22 + 1)).toBeUndefined();
  });
});

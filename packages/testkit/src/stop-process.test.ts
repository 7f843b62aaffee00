import { spawn } from "node:child_process";
import { readdirSync, readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { continueProcess, stopProcess } from "./stop-process.js";

/** The state letter of each thread of `pid`. */
const threadStates = (pid: number) =>
  readdirSync(`/proc/${pid}/task`).map((tid) => {
    const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, "utf8");
    return stat.charAt(stat.lastIndexOf(")") + 2);
  });

describe.runIf(process.platform === "linux")("stopProcess / continueProcess", () => {
  it("resolve only once every thread of the process is stopped, then running again", async () => {
    // A Node child: several threads (libuv's pool, V8's), one of them woken every millisecond.
    const child = spawn(process.execPath, ["-e", "setInterval(() => {}, 1)"], { stdio: "ignore" });
    try {
      await new Promise((r) => child.once("spawn", r));
      for (let i = 0; i < 20; i++) {
        await stopProcess(child.pid!, "the child");
        expect(threadStates(child.pid!).every((s) => s === "T")).toBe(true);
        await continueProcess(child.pid!, "the child");
        expect(threadStates(child.pid!).some((s) => s === "T")).toBe(false);
      }
    } finally {
      child.kill("SIGKILL");
    }
  });

  it("resolves at once for a process that is gone", async () => {
    const child = spawn(process.execPath, ["-e", ""], { stdio: "ignore" });
    const pid = child.pid!;
    await new Promise((r) => child.once("exit", r));
    await expect(continueProcess(pid)).rejects.toThrow(/ESRCH/);
  });
});

import { describe, expect, it } from "vitest";
import { Supervision } from "./stack-state.js";
import { describeSupervision, describeSupervisor } from "./supervision-report.js";

const at = Date.UTC(2025, 0, 1, 10, 0, 0);

describe("describeSupervision", () => {
  it("says a service never restarted so", () => {
    expect(describeSupervision({ pid: 1, address: "a", log: "l", restarts: 0, supervision: Supervision.RUNNING })).toBe("restarts 0");
  });

  it("shows the restarts and the last exit, with its time", () => {
    const s = { pid: 2, address: "a", log: "l", restarts: 1, supervision: Supervision.RUNNING, lastExit: { code: null, signal: "SIGKILL", at } };
    expect(describeSupervision(s)).toBe("restarts 1, last exit (signal SIGKILL) at 2025-01-01T10:00:00.000Z");
  });

  it("says when a service waits for its restart, is left stopped, or was given up, and why", () => {
    const base = { pid: undefined, address: "a", log: "l", restarts: 5, lastExit: { code: 1, signal: null, at } };
    expect(describeSupervision({ ...base, supervision: Supervision.RESTARTING })).toMatch(/\(exit code 1\) .*, RESTARTING$/);
    expect(describeSupervision({ ...base, supervision: Supervision.STOPPED, note: "exited 2" })).toMatch(/, STOPPED: exited 2$/);
    expect(describeSupervision({ ...base, supervision: Supervision.GAVE_UP, note: "too many" })).toMatch(/, GAVE UP: too many$/);
  });
});

describe("describeSupervisor", () => {
  it("says whether the supervisor runs, and what it means when it does not", () => {
    expect(describeSupervisor({ pid: 7, log: "s.log" }, () => true)).toMatch(/^supervisor pid 7 /);
    expect(describeSupervisor({ pid: 7, log: "s.log" }, () => false)).toMatch(/^supervisor NOT RUNNING \(pid 7\): a service that fails is not restarted/);
  });
});

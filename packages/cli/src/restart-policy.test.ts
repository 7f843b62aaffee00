import { describe, expect, it } from "vitest";
import { describeExit, RestartPolicy } from "./restart-policy.js";

const killed = { code: null, signal: "SIGKILL" } as const;
const failed = { code: 1, signal: null } as const;

describe("RestartPolicy", () => {
  it("restarts a service that failed (a non-zero exit or a signal), first after 500 ms", () => {
    expect(new RestartPolicy().decide(failed, 100, 0)).toEqual({ kind: "restart", delayMs: 500, restarts: 1 });
    expect(new RestartPolicy().decide(killed, 100, 0)).toEqual({ kind: "restart", delayMs: 500, restarts: 1 });
  });

  it("leaves a clean exit alone (on-failure: a graceful stop by hand is not a failure)", () => {
    expect(new RestartPolicy().decide({ code: 0, signal: null }, 100, 0)).toEqual({ kind: "leave", reason: "clean-exit" });
  });

  it("does not restart a configuration error (exit 2): it would fail the same way at every start", () => {
    expect(new RestartPolicy().decide({ code: 2, signal: null }, 100, 0)).toEqual({ kind: "leave", reason: "configuration-error" });
  });

  it("doubles the wait with each failure in a row, up to 10 s", () => {
    const policy = new RestartPolicy({ maxRestarts: 100 });
    const delays = Array.from({ length: 7 }, (_, i) => policy.decide(failed, 100, i * 100_000));
    expect(delays.map((d) => (d.kind === "restart" ? d.delayMs : d.kind))).toEqual([500, 1000, 2000, 4000, 8000, 10_000, 10_000]);
  });

  it("waits the first delay again after a run of at least 10 s (the restart had succeeded)", () => {
    const policy = new RestartPolicy();
    policy.decide(failed, 100, 0);
    policy.decide(failed, 100, 1_000);
    expect(policy.decide(failed, 9_999, 20_000)).toMatchObject({ delayMs: 2000 });
    expect(policy.decide(failed, 10_000, 40_000)).toMatchObject({ delayMs: 500 });
  });

  it("gives up after 5 restarts within 60 s, and counts only the restarts inside the window", () => {
    const policy = new RestartPolicy();
    for (let i = 0; i < 5; i++) expect(policy.decide(failed, 100, i * 1000)).toMatchObject({ kind: "restart", restarts: i + 1 });
    expect(policy.decide(failed, 100, 5_000)).toEqual({ kind: "give-up", restarts: 5, windowMs: 60_000 });
    // A minute after the first restart it falls out of the window: one more is allowed.
    expect(policy.decide(failed, 100, 60_000)).toMatchObject({ kind: "restart", restarts: 5 });
  });
});

describe("describeExit", () => {
  it("names the signal or the exit code", () => {
    expect(describeExit(killed)).toBe("signal SIGKILL");
    expect(describeExit(failed)).toBe("exit code 1");
  });
});

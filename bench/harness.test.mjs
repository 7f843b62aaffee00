import { spawn } from "node:child_process";
import { describe, expect, it } from "vitest";
import { childPids, runSection } from "./harness.mjs";

const quiet = { log: () => undefined };

describe("runSection", () => {
  it("records an ok section with its duration and the load average at its start and end", async () => {
    const sections = {};
    const record = await runSection("a", async () => undefined, { base: quiet, sections, timeoutMs: 10_000 });
    expect(record).toBe(sections.a);
    expect(record.status).toBe("ok");
    expect(record.loadavgStart).toHaveLength(3);
    expect(record.loadavgEnd).toHaveLength(3);
    expect(typeof record.seconds).toBe("number");
  });

  it("records a thrown error as the section's failure, with the phase it was in, and returns", async () => {
    const sections = {};
    await runSection(
      "b",
      async ({ phase }) => {
        phase("preparing guests", () => "12 of 100 guests ready");
        throw new Error("DEADLINE_EXCEEDED on BindGuestPasid");
      },
      { base: quiet, sections, timeoutMs: 10_000 },
    );
    expect(sections.b.status).toBe("failed");
    expect(sections.b.reason).toBe('DEADLINE_EXCEEDED on BindGuestPasid, in phase "preparing guests" (reached: 12 of 100 guests ready)');
  });

  it("fails a section that does not end by its deadline, saying where it was", async () => {
    const sections = {};
    await runSection(
      "c",
      async ({ phase }) => {
        phase("reclaim of 1,000 crashed guests", () => "734 of 1,000 sets freed");
        await new Promise(() => undefined);
      },
      { base: quiet, sections, timeoutMs: 50 },
    );
    expect(sections.c.reason).toBe('did not finish within 0 s, in phase "reclaim of 1,000 crashed guests" (reached: 734 of 1,000 sets freed)');
  }, 15_000); // the harness gives a section's function 5 s to unwind, and this one never does

  it("bounds a wait by its own timeout and names what did not happen", async () => {
    const sections = {};
    await runSection(
      "d",
      async ({ waitFor }) => {
        await waitFor(() => false, { timeoutMs: 20, what: "KVM to hold 64 translations", progress: () => "17" });
      },
      { base: quiet, sections, timeoutMs: 10_000 },
    );
    expect(sections.d.reason).toMatch(/^timed out after 20 ms waiting for KVM to hold 64 translations; reached: 17, in phase "starting"$/);
  });

  it("stops what the section owns when it ends", async () => {
    const stopped = [];
    await runSection(
      "e",
      async ({ own }) => {
        own("first", () => stopped.push("first"));
        own("second", () => stopped.push("second"));
        throw new Error("boom");
      },
      { base: quiet, sections: {}, timeoutMs: 10_000 },
    );
    expect(stopped).toEqual(["second", "first"]);
  });
});

describe("childPids", () => {
  it.skipIf(process.platform !== "linux")("lists a child this process started, and not once it has exited", async () => {
    const child = spawn("sleep", ["30"], { stdio: "ignore" });
    try {
      expect(childPids()).toContain(child.pid);
    } finally {
      child.kill("SIGKILL");
    }
    await new Promise((resolve) => child.once("exit", resolve));
    expect(childPids()).not.toContain(child.pid);
  });
});

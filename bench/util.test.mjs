import { afterEach, describe, expect, it } from "vitest";
import { envCount, pool, retrying, serviceNodeArgs, withTimeout } from "./util.mjs";

describe("withTimeout", () => {
  it("settles like the promise when it settles in time", async () => {
    await expect(withTimeout(Promise.resolve(7), 1000, "seven")).resolves.toBe(7);
    await expect(withTimeout(Promise.reject(new Error("no")), 1000, "seven")).rejects.toThrow("no");
  });

  it("says what did not happen and what was reached when the time passes", async () => {
    const never = new Promise(() => undefined);
    await expect(withTimeout(never, 20, "the SET_FREE of 3 sets", () => "1 of 3 sets freed")).rejects.toThrow(
      "timed out after 20 ms waiting for the SET_FREE of 3 sets; reached: 1 of 3 sets freed",
    );
  });
});

describe("pool", () => {
  it("never runs more than its concurrency at once, and keeps the results in order", async () => {
    let running = 0;
    let most = 0;
    const out = await pool(20, 3, async (i) => {
      running++;
      most = Math.max(most, running);
      await new Promise((r) => setImmediate(r));
      running--;
      return i * 2;
    });
    expect(most).toBe(3);
    expect(out).toEqual(Array.from({ length: 20 }, (_, i) => i * 2));
  });

  it("starts nothing new after a failure and rejects with it", async () => {
    const started = [];
    await expect(
      pool(10, 2, async (i) => {
        started.push(i);
        await new Promise((r) => setImmediate(r));
        if (i === 1) throw new Error("guest 1 failed");
      }),
    ).rejects.toThrow("guest 1 failed");
    expect(started.length).toBeLessThanOrEqual(3);
  });

  it("stops starting work once its signal aborts", async () => {
    const ac = new AbortController();
    ac.abort(new Error("section ended"));
    await expect(pool(5, 2, async () => 1, { signal: ac.signal })).rejects.toThrow("section ended");
  });
});

describe("retrying", () => {
  const deadline = Object.assign(new Error("deadline"), { reason: "DEADLINE_EXCEEDED" });
  const retryOn = (err) => err.reason === "DEADLINE_EXCEEDED";

  it("retries a retryable failure up to its attempts, and tells of each retry", async () => {
    const retries = [];
    let calls = 0;
    const value = await retrying(
      async () => {
        if (++calls < 3) throw deadline;
        return "bound";
      },
      { attempts: 3, retryOn, onRetry: (_err, attempt) => retries.push(attempt) },
    );
    expect(value).toBe("bound");
    expect(retries).toEqual([1, 2]);
  });

  it("throws the last failure once the attempts are spent", async () => {
    let calls = 0;
    await expect(
      retrying(
        async () => {
          calls++;
          throw deadline;
        },
        { attempts: 3, retryOn },
      ),
    ).rejects.toBe(deadline);
    expect(calls).toBe(3);
  });

  it("does not retry any other failure", async () => {
    let calls = 0;
    await expect(
      retrying(
        async () => {
          calls++;
          throw new Error("SET_QUOTA_EXCEEDED");
        },
        { attempts: 3, retryOn },
      ),
    ).rejects.toThrow("SET_QUOTA_EXCEEDED");
    expect(calls).toBe(1);
  });
});

describe("envCount", () => {
  const name = "BENCH_UTIL_TEST_COUNT";
  afterEach(() => delete process.env[name]);

  it("is the fallback when unset or empty, else the number given", () => {
    expect(envCount(name, 7)).toBe(7);
    process.env[name] = "";
    expect(envCount(name, 7)).toBe(7);
    process.env[name] = "40";
    expect(envCount(name, 7)).toBe(40);
    process.env[name] = "0";
    expect(envCount(name, 7, 0)).toBe(0);
  });

  it("refuses what is not a whole number at least the minimum, naming the variable", () => {
    for (const bad of ["abc", "2.5", "-1", "0"]) {
      process.env[name] = bad;
      expect(() => envCount(name, 7)).toThrow(`${name}=${JSON.stringify(bad)}: expected a whole number ≥ 1`);
    }
  });
});

describe("serviceNodeArgs", () => {
  it("passes BENCH_SERVICE_NODE_ARGS as given, split on spaces", () => {
    expect(serviceNodeArgs("grpc", { BENCH_SERVICE_NODE_ARGS: " --max-semi-space-size=64  --cpu-prof ", BENCH_PROFILE: "1" })).toEqual([
      "--max-semi-space-size=64",
      "--cpu-prof",
    ]);
  });

  it("profiles into the section's own directory with BENCH_PROFILE=1, and adds nothing without it", () => {
    const args = serviceNodeArgs("grpc", { BENCH_PROFILE: "1" });
    expect(args[0]).toBe("--cpu-prof");
    expect(args[1]).toMatch(/^--cpu-prof-dir=.*\/bench\/results\/profiles\/grpc\/$/);
    expect(serviceNodeArgs("grpc", {})).toEqual([]);
  });
});

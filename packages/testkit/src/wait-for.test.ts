import { describe, expect, it } from "vitest";
import { waitFor } from "./wait-for.js";

describe("waitFor", () => {
  it("resolves as soon as the condition holds", async () => {
    let calls = 0;
    await waitFor(() => ++calls === 3, { intervalMs: 1 });
    expect(calls).toBe(3);
  });

  it("accepts an async condition", async () => {
    await expect(waitFor(async () => true)).resolves.toBeUndefined();
  });

  it("fails after the timeout, saying what it waited for", async () => {
    await expect(waitFor(() => false, { timeoutMs: 50, message: "three FREE events" })).rejects.toThrow("timed out after 50 ms waiting for three FREE events");
  });

  it("counts a throwing condition as false and quotes its last error", async () => {
    await expect(
      waitFor(
        () => {
          throw new Error("ECONNREFUSED");
        },
        { timeoutMs: 30 },
      ),
    ).rejects.toThrow(/last error: ECONNREFUSED/);
  });

  it("stops at once with the reason when its signal aborts", async () => {
    const controller = new AbortController();
    const waiting = waitFor(() => false, { timeoutMs: 60_000, signal: controller.signal });
    controller.abort(new Error("nats-server exited"));
    await expect(waiting).rejects.toThrow("nats-server exited");
  });
});

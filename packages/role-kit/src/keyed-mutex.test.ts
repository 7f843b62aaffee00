import { describe, expect, it } from "vitest";
import { KeyedMutex } from "./keyed-mutex.js";

describe("KeyedMutex", () => {
  it("runs work on one key one at a time, in call order, and work on other keys alongside", async () => {
    const locks = new KeyedMutex();
    const log: string[] = [];
    let releaseA!: () => void;
    const gate = new Promise<void>((r) => (releaseA = r));
    const a1 = locks.run("a", async () => {
      log.push("a1 start");
      await gate;
      log.push("a1 end");
    });
    const a2 = locks.run("a", () => log.push("a2"));
    const b = locks.run("b", () => log.push("b"));
    await b;
    expect(log).toEqual(["a1 start", "b"]);
    expect(locks.isIdle("a")).toBe(false);
    releaseA();
    await Promise.all([a1, a2]);
    expect(log).toEqual(["a1 start", "b", "a1 end", "a2"]);
    await Promise.resolve();
    expect(locks.isIdle("a")).toBe(true);
  });

  it("keeps going after a failed work and passes its error to its caller only", async () => {
    const locks = new KeyedMutex();
    const failed = locks.run("k", () => {
      throw new Error("boom");
    });
    const next = locks.run("k", () => 42);
    await expect(failed).rejects.toThrow("boom");
    await expect(next).resolves.toBe(42);
  });
});

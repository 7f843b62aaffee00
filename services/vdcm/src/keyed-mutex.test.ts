import { describe, expect, it } from "vitest";
import { KeyedMutex } from "./keyed-mutex.js";

describe("KeyedMutex", () => {
  it("runs holders of one key one at a time in order, other keys in parallel, and forgets idle keys", async () => {
    const m = new KeyedMutex();
    const log: string[] = [];
    let releaseA!: () => void;
    const a1 = m.run("a", async () => {
      log.push("a1 start");
      await new Promise<void>((r) => (releaseA = r));
      log.push("a1 end");
    });
    const a2 = m.run("a", () => log.push("a2"));
    const b = m.run("b", () => log.push("b"));
    await b;
    expect(log).toEqual(["a1 start", "b"]);
    releaseA();
    await Promise.all([a1, a2]);
    expect(log).toEqual(["a1 start", "b", "a1 end", "a2"]);
    expect(m.size).toBe(0);
  });

  it("releases the key when a holder throws", async () => {
    const m = new KeyedMutex();
    await expect(m.run("a", () => Promise.reject(new Error("boom")))).rejects.toThrow("boom");
    expect(await m.run("a", () => 42)).toBe(42);
    expect(m.size).toBe(0);
  });
});

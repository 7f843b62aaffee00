import { describe, expect, it } from "vitest";
import { failStopOnWriteError, type RoleStatePort } from "./role-state.js";

describe("failStopOnWriteError", () => {
  it("passes writes through, and on a failed write calls the fatal handler and never lets the caller go on", async () => {
    let fail = false;
    const written: string[] = [];
    const store: RoleStatePort = {
      write: async (changes) => {
        if (fail) throw new Error("timeout");
        written.push(...changes.map((c) => c.key));
      },
    };
    const fatal: unknown[] = [];
    const kept = failStopOnWriteError(store, (err) => fatal.push(err));
    await kept.write([{ key: "a", value: 1 }]);
    expect(written).toEqual(["a"]);
    fail = true;
    let settled = false;
    void kept.write([{ key: "b", value: 2 }]).finally(() => (settled = true));
    await new Promise((r) => setTimeout(r, 20));
    expect(fatal).toHaveLength(1);
    expect(settled).toBe(false);
  });

  it("hands the error to the caller instead while the role is already stopping", async () => {
    const store: RoleStatePort = { write: async () => Promise.reject(new Error("closed")) };
    const fatal: unknown[] = [];
    const kept = failStopOnWriteError(store, (err) => fatal.push(err), { stopping: () => true });
    await expect(kept.write([{ key: "a", value: 1 }])).rejects.toThrow("closed");
    expect(fatal).toEqual([]);
  });
});

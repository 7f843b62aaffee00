import { describe, expect, it } from "vitest";
import { Code } from "@ioasid/errors";
import { FaultHandlers, type FaultItem } from "./fault-handlers.js";

const noop = () => undefined;

describe("FaultHandlers", () => {
  it("keeps one stream per owner: a new subscription ends the previous one with FAULT_HANDLER_REPLACED", async () => {
    const f = new FaultHandlers();
    const first = f.subscribe("vfio/1", new AbortController().signal, noop);
    const ac = new AbortController();
    const second = f.subscribe("vfio/1", ac.signal, noop);
    await expect(first).rejects.toMatchObject({ code: Code.ABORTED, reason: "FAULT_HANDLER_REPLACED" });
    expect(f.owners()).toEqual(["vfio/1"]);
    ac.abort();
    await expect(second).resolves.toBeUndefined();
    expect(f.owners()).toEqual([]);
  });

  it("ends every stream on close and refuses an empty owner", async () => {
    const f = new FaultHandlers();
    const s = f.subscribe("a", new AbortController().signal, noop);
    f.closeAll();
    await expect(s).resolves.toBeUndefined();
    await expect(f.subscribe("", new AbortController().signal, noop)).rejects.toMatchObject({ reason: "INVALID_FIELD" });
  });

  it("sends the initial items first, then what is pushed to that owner only; push says whether a stream was there", () => {
    const f = new FaultHandlers();
    const got: FaultItem[] = [];
    const initial = { kind: "fault", record: { faultId: 1n } } as unknown as FaultItem;
    void f.subscribe("a", new AbortController().signal, (i) => got.push(i), [initial]);
    const pushed = { kind: "fault", record: { faultId: 2n } } as unknown as FaultItem;
    expect(f.push("a", pushed)).toBe(true);
    expect(f.push("b", pushed)).toBe(false);
    expect(got).toEqual([initial, pushed]);
    f.closeAll();
    expect(f.push("a", pushed)).toBe(false);
  });
});

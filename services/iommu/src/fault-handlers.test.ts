import { describe, expect, it } from "vitest";
import { Code, DomainError } from "@ioasid/errors";
import { FaultHandlers } from "./fault-handlers.js";

describe("FaultHandlers", () => {
  it("keeps one stream per owner: a new subscription ends the previous one with FAULT_HANDLER_REPLACED", async () => {
    const f = new FaultHandlers();
    const first = f.subscribe("vfio/1", new AbortController().signal);
    const ac = new AbortController();
    const second = f.subscribe("vfio/1", ac.signal);
    await expect(first).rejects.toMatchObject({ code: Code.ABORTED, reason: "FAULT_HANDLER_REPLACED" });
    expect(f.owners()).toEqual(["vfio/1"]);
    ac.abort();
    await expect(second).resolves.toBeUndefined();
    expect(f.owners()).toEqual([]);
  });

  it("ends every stream on close and refuses an empty owner", async () => {
    const f = new FaultHandlers();
    const s = f.subscribe("a", new AbortController().signal);
    f.closeAll();
    await expect(s).resolves.toBeUndefined();
    await expect(f.subscribe("", new AbortController().signal)).rejects.toMatchObject({ reason: "INVALID_FIELD" });
  });

  it("answers page responses for groups that do not exist with FAULT_GROUP_NOT_FOUND", () => {
    const f = new FaultHandlers();
    expect(() => f.respond("vfio/1", 5n)).toThrow(DomainError);
    expect(() => f.respond("vfio/1", 5n)).toThrow(expect.objectContaining({ code: Code.NOT_FOUND, reason: "FAULT_GROUP_NOT_FOUND" }));
    expect(() => f.respond("", 5n)).toThrow(expect.objectContaining({ reason: "INVALID_FIELD" }));
  });
});

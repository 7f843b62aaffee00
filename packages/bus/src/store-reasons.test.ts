import { errors } from "@ioasid/proto";
import { describe, expect, it } from "vitest";
import { historyFormatError } from "./history-catalogue.js";
import { ROLE_STATE_UNREADABLE } from "./role-state.js";

// DESIGN §8: one error model, every reason stable and listed in errors.proto — also the reasons
// raised where a store is read (never sent on the wire, but logged and matched by tools).
describe("the stores' refusal reasons", () => {
  it("are ErrorReason values of errors.proto", () => {
    const listed = Object.keys(errors.ErrorReason).map((k) => k.replace(/^ERROR_REASON_/, ""));
    expect(listed).toContain(ROLE_STATE_UNREADABLE);
    expect(listed).toContain(historyFormatError("here", "why").reason);
  });
});

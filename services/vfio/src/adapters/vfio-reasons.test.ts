import { errors } from "@ioasid/proto";
import { Code } from "@ioasid/errors";
import { describe, expect, it } from "vitest";
import { VfioReason } from "../domain/vfio-errors.js";

describe("VfioReason", () => {
  it("names only reasons of errors.proto (the capability refusals included)", () => {
    const listed = Object.keys(errors.ErrorReason).map((k) => k.replace(/^ERROR_REASON_/, ""));
    for (const reason of Object.keys(VfioReason)) expect(listed, `errors.proto lacks ${reason}`).toContain(reason);
    expect(VfioReason).toMatchObject({ CAPABILITY_MISSING: Code.PERMISSION_DENIED, CAPABILITY_NOT_FOR_CONTAINER: Code.PERMISSION_DENIED });
  });
});

import { describe, expect, it } from "vitest";
import { parseApiAudit } from "./stream-admin-audit.js";

// The advisories below are nats-server 2.9.10's, as it published them for an operator's calls.
const advisory = (subject: string, response: object, client: object = { acc: "$G", rtt: 999153, server: "NC4I" }): string =>
  JSON.stringify({
    type: "io.nats.jetstream.advisory.v1.api_audit",
    id: "x",
    timestamp: "2026-12-05T11:55:54Z",
    server: "NC4I",
    client,
    subject,
    response: JSON.stringify(response),
  });

describe("parseApiAudit", () => {
  it("reads the stream administration calls, with the stream and the outcome", () => {
    expect(
      parseApiAudit(advisory("$JS.API.STREAM.PURGE.IOASID_CORE_OPS", { type: "io.nats.jetstream.api.v1.stream_purge_response", success: true, purged: 3 })),
    ).toEqual({
      api: "STREAM.PURGE",
      stream: "IOASID_CORE_OPS",
      user: "",
      ok: true,
      error: "",
    });
    expect(parseApiAudit(advisory("$JS.API.STREAM.MSG.DELETE.IOASID_HISTORY", { success: true }))).toMatchObject({
      api: "STREAM.MSG.DELETE",
      stream: "IOASID_HISTORY",
    });
    expect(parseApiAudit(advisory("$JS.API.STREAM.DELETE.X", { error: { code: 404, err_code: 10059, description: "stream not found" } }))).toEqual({
      api: "STREAM.DELETE",
      stream: "X",
      user: "",
      ok: false,
      error: "stream not found",
    });
  });

  it("names the user when the server does", () => {
    expect(parseApiAudit(advisory("$JS.API.STREAM.UPDATE.X", { success: true }, { acc: "$G", user: "UOPERATOR" }))?.user).toBe("UOPERATOR");
  });

  it("ignores every other call, and bytes that are not an advisory", () => {
    for (const subject of ["$JS.API.INFO", "$JS.API.STREAM.CREATE.X", "$JS.API.STREAM.INFO.X", "$JS.API.CONSUMER.DELETE.X.c", "$JS.API.STREAM.DELETEX"]) {
      expect(parseApiAudit(advisory(subject, { success: true })), subject).toBeUndefined();
    }
    expect(parseApiAudit("not json")).toBeUndefined();
    expect(parseApiAudit(JSON.stringify({ subject: 7 }))).toBeUndefined();
  });
});

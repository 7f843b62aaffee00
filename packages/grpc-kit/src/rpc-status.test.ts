import { BinaryWriter, WireType } from "@bufbuild/protobuf/wire";
import { describe, expect, it } from "vitest";
import { ERROR_INFO_TYPE_URL, decodeErrorInfo, decodeRpcStatus, encodeErrorInfo, encodeRpcStatus, findErrorInfo } from "./rpc-status.js";

describe("google.rpc.Status codec", () => {
  it("round-trips a status whose one detail is an ErrorInfo with metadata", () => {
    const info = { reason: "IOASID_FREE_PENDING", domain: "ioasid.dev", metadata: { ioasid: "201", set: "7" } };
    const bytes = encodeRpcStatus({
      code: 5,
      message: "IOASID 201 is being freed",
      details: [{ typeUrl: ERROR_INFO_TYPE_URL, value: encodeErrorInfo(info) }],
    });
    const status = decodeRpcStatus(bytes);
    expect(status.code).toBe(5);
    expect(status.message).toBe("IOASID 201 is being freed");
    expect(status.details).toHaveLength(1);
    expect(findErrorInfo(status)).toEqual(info);
  });

  it("encodes the field numbers of status.proto and error_details.proto", () => {
    // Status{code=3 (field 1), message="m" (field 2)} as any protobuf runtime writes it.
    expect([...encodeRpcStatus({ code: 3, message: "m", details: [] })]).toEqual([0x08, 3, 0x12, 1, 0x6d]);
    // ErrorInfo{reason="R" (field 1), domain="d" (field 2)}.
    expect([...encodeErrorInfo({ reason: "R", domain: "d", metadata: {} })]).toEqual([0x0a, 1, 0x52, 0x12, 1, 0x64]);
  });

  it("skips fields it does not know and details of other types", () => {
    const w = new BinaryWriter();
    w.tag(1, WireType.Varint).int32(9);
    w.tag(9, WireType.LengthDelimited).string("future field");
    w.tag(3, WireType.LengthDelimited).fork();
    w.tag(1, WireType.LengthDelimited).string("type.googleapis.com/google.rpc.RetryInfo");
    w.tag(2, WireType.LengthDelimited).bytes(new Uint8Array([1, 2, 3]));
    w.join();
    const status = decodeRpcStatus(w.finish());
    expect(status.code).toBe(9);
    expect(status.details).toHaveLength(1);
    expect(findErrorInfo(status)).toBeUndefined();
  });

  it("decodes an empty ErrorInfo to empty fields", () => {
    expect(decodeErrorInfo(new Uint8Array(0))).toEqual({ reason: "", domain: "", metadata: {} });
  });
});

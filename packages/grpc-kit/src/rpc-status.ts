import { BinaryReader, BinaryWriter, WireType } from "@bufbuild/protobuf/wire";

/**
 * Trailing metadata key that carries a serialized {@link RpcStatus} next to the plain gRPC status
 * (the "richer error model" every gRPC implementation understands).
 */
export const STATUS_DETAILS_KEY = "grpc-status-details-bin";

/** `type_url` of a google.rpc.ErrorInfo packed in a google.protobuf.Any. */
export const ERROR_INFO_TYPE_URL = "type.googleapis.com/google.rpc.ErrorInfo";

/** google.protobuf.Any: a serialized message tagged with its type URL. */
export interface AnyMessage {
  /** e.g. {@link ERROR_INFO_TYPE_URL}. */
  readonly typeUrl: string;
  /** The serialized message. */
  readonly value: Uint8Array;
}

/** google.rpc.ErrorInfo: the stable reason of an error, the domain that qualifies it, and facts. */
export interface ErrorInfo {
  /** Stable machine-readable reason (UPPER_SNAKE_CASE), e.g. `IOASID_FREE_PENDING`. */
  readonly reason: string;
  /** The domain the reason belongs to (ours is `ioasid.dev`). */
  readonly domain: string;
  /** Extra key/value facts about the error. */
  readonly metadata: Readonly<Record<string, string>>;
}

/** google.rpc.Status: code, message and typed details of a failed call. */
export interface RpcStatus {
  /** gRPC status code. */
  readonly code: number;
  /** Message for a person. */
  readonly message: string;
  /** Typed details; ours always holds exactly one ErrorInfo. */
  readonly details: readonly AnyMessage[];
}

// These three messages are encoded by hand (field numbers from google/rpc/status.proto,
// google/rpc/error_details.proto and google/protobuf/any.proto) so that grpc-kit does not need
// generated code or .proto files for a fixed, tiny wire contract.

/** Serializes a google.rpc.ErrorInfo. */
export function encodeErrorInfo(info: ErrorInfo): Uint8Array {
  const w = new BinaryWriter();
  if (info.reason !== "") w.tag(1, WireType.LengthDelimited).string(info.reason);
  if (info.domain !== "") w.tag(2, WireType.LengthDelimited).string(info.domain);
  for (const [key, value] of Object.entries(info.metadata)) {
    // map<string,string> is a repeated entry message {key = 1; value = 2}.
    w.tag(3, WireType.LengthDelimited).fork();
    w.tag(1, WireType.LengthDelimited).string(key);
    w.tag(2, WireType.LengthDelimited).string(value);
    w.join();
  }
  return w.finish();
}

/**
 * Parses a google.rpc.ErrorInfo.
 * @throws Error when the bytes are not a valid message.
 */
export function decodeErrorInfo(bytes: Uint8Array): ErrorInfo {
  const r = new BinaryReader(bytes);
  let reason = "";
  let domain = "";
  const metadata: Record<string, string> = {};
  while (r.pos < r.len) {
    const [field, wireType] = r.tag();
    if (field === 1 && wireType === WireType.LengthDelimited) reason = r.string();
    else if (field === 2 && wireType === WireType.LengthDelimited) domain = r.string();
    else if (field === 3 && wireType === WireType.LengthDelimited) {
      const entry = new BinaryReader(r.bytes());
      let key = "";
      let value = "";
      while (entry.pos < entry.len) {
        const [f, wt] = entry.tag();
        if (f === 1 && wt === WireType.LengthDelimited) key = entry.string();
        else if (f === 2 && wt === WireType.LengthDelimited) value = entry.string();
        else entry.skip(wt, f);
      }
      metadata[key] = value;
    } else r.skip(wireType, field);
  }
  return { reason, domain, metadata };
}

/** Serializes a google.rpc.Status (with its details as google.protobuf.Any). */
export function encodeRpcStatus(status: RpcStatus): Uint8Array {
  const w = new BinaryWriter();
  if (status.code !== 0) w.tag(1, WireType.Varint).int32(status.code);
  if (status.message !== "") w.tag(2, WireType.LengthDelimited).string(status.message);
  for (const detail of status.details) {
    w.tag(3, WireType.LengthDelimited).fork();
    if (detail.typeUrl !== "") w.tag(1, WireType.LengthDelimited).string(detail.typeUrl);
    if (detail.value.length > 0) w.tag(2, WireType.LengthDelimited).bytes(detail.value);
    w.join();
  }
  return w.finish();
}

/**
 * Parses a google.rpc.Status.
 * @throws Error when the bytes are not a valid message.
 */
export function decodeRpcStatus(bytes: Uint8Array): RpcStatus {
  const r = new BinaryReader(bytes);
  let code = 0;
  let message = "";
  const details: AnyMessage[] = [];
  while (r.pos < r.len) {
    const [field, wireType] = r.tag();
    if (field === 1 && wireType === WireType.Varint) code = r.int32();
    else if (field === 2 && wireType === WireType.LengthDelimited) message = r.string();
    else if (field === 3 && wireType === WireType.LengthDelimited) {
      const any = new BinaryReader(r.bytes());
      let typeUrl = "";
      let value: Uint8Array = new Uint8Array(0);
      while (any.pos < any.len) {
        const [f, wt] = any.tag();
        if (f === 1 && wt === WireType.LengthDelimited) typeUrl = any.string();
        else if (f === 2 && wt === WireType.LengthDelimited) value = any.bytes();
        else any.skip(wt, f);
      }
      details.push({ typeUrl, value });
    } else r.skip(wireType, field);
  }
  return { code, message, details };
}

/** The first ErrorInfo among a status's details, if any (undecodable details are ignored). */
export function findErrorInfo(status: RpcStatus): ErrorInfo | undefined {
  for (const detail of status.details) {
    if (detail.typeUrl !== ERROR_INFO_TYPE_URL) continue;
    try {
      return decodeErrorInfo(detail.value);
    } catch {
      continue;
    }
  }
  return undefined;
}

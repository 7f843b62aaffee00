import { BinaryReader, BinaryWriter, WireType } from "@bufbuild/protobuf/wire";
import { Code, isDomainError } from "@ioasid/errors";
import { createClient, type CreateClientOptions } from "./create-client.js";
import { ServingStatus } from "./grpc-server.js";

/** grpc.health.v1.HealthCheckRequest. */
interface HealthCheckRequest {
  readonly service: string;
}

/** grpc.health.v1.HealthCheckResponse, status as its enum name. */
interface HealthCheckResponse {
  readonly status: ServingStatus;
}

// Enum numbers of grpc.health.v1.HealthCheckResponse.ServingStatus.
const statusByNumber: readonly ServingStatus[] = [ServingStatus.UNKNOWN, ServingStatus.SERVING, ServingStatus.NOT_SERVING, ServingStatus.SERVICE_UNKNOWN];

function encodeRequest(request: HealthCheckRequest): Buffer {
  const w = new BinaryWriter();
  if (request.service !== "") w.tag(1, WireType.LengthDelimited).string(request.service);
  return Buffer.from(w.finish());
}

function decodeRequest(bytes: Buffer): HealthCheckRequest {
  const r = new BinaryReader(bytes);
  let service = "";
  while (r.pos < r.len) {
    const [field, wireType] = r.tag();
    if (field === 1 && wireType === WireType.LengthDelimited) service = r.string();
    else r.skip(wireType, field);
  }
  return { service };
}

function encodeResponse(response: HealthCheckResponse): Buffer {
  const w = new BinaryWriter();
  const n = statusByNumber.indexOf(response.status);
  if (n > 0) w.tag(1, WireType.Varint).int32(n);
  return Buffer.from(w.finish());
}

function decodeResponse(bytes: Buffer): HealthCheckResponse {
  const r = new BinaryReader(bytes);
  let status: ServingStatus = ServingStatus.UNKNOWN;
  while (r.pos < r.len) {
    const [field, wireType] = r.tag();
    if (field === 1 && wireType === WireType.Varint) status = statusByNumber[r.int32()] ?? ServingStatus.UNKNOWN;
    else r.skip(wireType, field);
  }
  return { status };
}

/**
 * The client half of the standard gRPC health service (grpc.health.v1.Health), encoded by hand
 * like the status details: two tiny messages do not justify loading health.proto at run time.
 */
export const HealthServiceDefinition = {
  /** Check answers the current status of one service (NOT_FOUND for a name the server does not know). */
  check: {
    path: "/grpc.health.v1.Health/Check" as const,
    requestStream: false as const,
    responseStream: false as const,
    requestSerialize: encodeRequest,
    requestDeserialize: decodeRequest,
    responseSerialize: encodeResponse,
    responseDeserialize: decodeResponse,
  },
  /** Watch streams the status of one service, first the current one, then every change. */
  watch: {
    path: "/grpc.health.v1.Health/Watch" as const,
    requestStream: false as const,
    responseStream: true as const,
    requestSerialize: encodeRequest,
    requestDeserialize: decodeRequest,
    responseSerialize: encodeResponse,
    responseDeserialize: decodeResponse,
  },
} as const;

/** Options of {@link checkHealth}. */
export interface CheckHealthOptions {
  /** @default 2000 */
  readonly deadlineMs?: number;
  /** Client options (credentials, channel options). */
  readonly client?: Omit<CreateClientOptions, "deadlineMs">;
}

/**
 * Asks the health service at `address` for the status of `service` (`""` = the whole server).
 * A name the server does not know answers SERVICE_UNKNOWN.
 * @throws DomainError when the server cannot be reached (UNAVAILABLE, DEADLINE_EXCEEDED).
 * @example
 * if ((await checkHealth("127.0.0.1:50051")) === "SERVING") …
 */
export async function checkHealth(address: string, service = "", options: CheckHealthOptions = {}): Promise<ServingStatus> {
  const client = createClient(HealthServiceDefinition, address, { ...options.client, deadlineMs: options.deadlineMs ?? 2000 });
  try {
    return (await client.check({ service })).status;
  } catch (err) {
    if (isDomainError(err) && err.code === Code.NOT_FOUND) return ServingStatus.SERVICE_UNKNOWN;
    throw err;
  } finally {
    client.close();
  }
}

/**
 * Follows the status of `service` at `address` (`""` = the whole server): yields the current status,
 * then every change, until `signal` aborts (the iteration then ends quietly) or the server goes away
 * (it then throws a DomainError).
 */
export async function* watchHealth(
  address: string,
  service = "",
  options: { readonly signal?: AbortSignal; readonly client?: CreateClientOptions } = {},
): AsyncGenerator<ServingStatus, void, undefined> {
  const client = createClient(HealthServiceDefinition, address, options.client);
  try {
    for await (const { status } of client.watch({ service }, options.signal === undefined ? {} : { signal: options.signal })) {
      yield status;
    }
  } catch (err) {
    if (options.signal?.aborted === true) return;
    throw err;
  } finally {
    client.close();
  }
}

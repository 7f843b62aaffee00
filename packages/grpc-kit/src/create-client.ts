import {
  Client,
  Metadata,
  credentials as grpcCredentials,
  type CallOptions as GrpcCallOptions,
  type ChannelCredentials,
  type ClientDuplexStream,
  type ClientOptions,
  type ClientReadableStream,
  type ClientWritableStream,
} from "@grpc/grpc-js";
import { Code, DomainError } from "@ioasid/errors";
import type { InstanceCredentials, Role } from "@ioasid/security";
import type { AnyMethodDefinition, AnyServiceDefinition, RequestOf, ResponseOf } from "./adapt-service.js";
import { clientCredentials } from "./tls.js";
import { toDomainError } from "./to-domain-error.js";
import { historyClientInterceptor } from "./history-calls.js";
import { traceClientInterceptor } from "./trace-calls.js";

/** Per-call options of a {@link PromiseClient} method. */
export interface CallOptions {
  /**
   * Time the call may take, in milliseconds. Unary and client-streaming calls default to the
   * client's `deadlineMs`; streams with a response stream default to the client's `streamDeadlineMs`.
   */
  readonly deadlineMs?: number;
  /** Aborting it cancels the call; the call then fails with CANCELLED. */
  readonly signal?: AbortSignal;
  /** Request metadata (headers). */
  readonly metadata?: Metadata | Readonly<Record<string, string>>;
}

/** A bidirectional call: send requests, read responses, end or cancel. */
export interface BidiStream<Req, Res> {
  /** Sends one request; the promise resolves at once unless the transport applies backpressure. */
  send(message: Req): Promise<void>;
  /** Half-closes: no more requests (responses keep coming until the server ends the call). */
  end(): void;
  /** The responses; iteration throws the call's error as a DomainError; leaving it early cancels. */
  readonly responses: AsyncIterable<Res>;
  /** Cancels the call (the server's ctx.signal aborts). */
  cancel(): void;
}

/** A client-streaming call: send requests, then end and receive the one response. */
export interface ClientStream<Req, Res> {
  /** Sends one request; the promise resolves at once unless the transport applies backpressure. */
  send(message: Req): Promise<void>;
  /** Half-closes and waits for the response. @throws DomainError the call's error. */
  end(): Promise<Res>;
  /** Cancels the call. */
  cancel(): void;
}

/** The promise-based form of method definition `M`, chosen by its streaming flags. */
export type ClientMethod<M> = M extends { requestStream: true; responseStream: true }
  ? (options?: CallOptions) => BidiStream<RequestOf<M>, ResponseOf<M>>
  : M extends { requestStream: true }
    ? (options?: CallOptions) => ClientStream<RequestOf<M>, ResponseOf<M>>
    : M extends { responseStream: true }
      ? (request: RequestOf<M>, options?: CallOptions) => AsyncIterable<ResponseOf<M>>
      : (request: RequestOf<M>, options?: CallOptions) => Promise<ResponseOf<M>>;

/**
 * A promise-based client of service definition `D`: every method of the generated client, with
 * deadlines by default and errors rebuilt as {@link DomainError} ({@link toDomainError}).
 */
export type PromiseClient<D> = { readonly [K in keyof D]: ClientMethod<D[K]> } & {
  /** Closes the channel; calls in flight fail with CANCELLED/UNAVAILABLE. */
  close(): void;
  /** The underlying grpc-js client. */
  readonly raw: Client;
  /** The address the client connects to. */
  readonly address: string;
};

/** A ts-proto generated client constructor (`testing.EchoServiceClient`): it carries its definition. */
export interface ClientConstructor<D extends AnyServiceDefinition> {
  new (address: string, credentials: ChannelCredentials, options?: Partial<ClientOptions>): Client;
  readonly service: D;
}

/** Options of {@link createClient}. */
export interface CreateClientOptions {
  /** Deadline of every unary and client-streaming call, in ms. @default 5000 */
  readonly deadlineMs?: number;
  /**
   * Deadline of calls with a response stream, in ms. Streams are long-lived (event feeds) and end
   * by cancellation; give one here or per call to bound them. @default none
   */
  readonly streamDeadlineMs?: number;
  /** @default insecure (loopback and compose networks), or mTLS when `tls` is given */
  readonly credentials?: ChannelCredentials;
  /**
   * The caller's role instance credentials (`loadCredentials`): the client speaks mTLS, presenting
   * its certificate and trusting only the stack CA (DESIGN §11). Ignored when `credentials` is given.
   */
  readonly tls?: InstanceCredentials;
  /** With `tls`: the role the server must prove it is (see `clientCredentials`). @default unchecked */
  readonly serverRole?: Role;
  /** grpc-js channel options. */
  readonly channelOptions?: Partial<ClientOptions>;
}

/**
 * Creates a promise-based client for a generated service: unary methods return promises, server
 * streams AsyncIterables, bidi calls a {@link BidiStream}. Every unary call has a deadline
 * (`deadlineMs`, default 5 s); every failure is a {@link DomainError}.
 *
 * @example
 * const echo = createClient(testing.EchoServiceClient, "127.0.0.1:50051");
 * const res = await echo.echo({ payload: Buffer.from("hi") }, { deadlineMs: 500 });
 * echo.close();
 */
export function createClient<D extends AnyServiceDefinition>(ctor: ClientConstructor<D>, address: string, options?: CreateClientOptions): PromiseClient<D>;
/** Same, from a bare service definition (any `{ path, requestStream, … }` map). */
export function createClient<D extends AnyServiceDefinition>(definition: D, address: string, options?: CreateClientOptions): PromiseClient<D>;
export function createClient<D extends AnyServiceDefinition>(
  source: ClientConstructor<D> | D,
  address: string,
  options: CreateClientOptions = {},
): PromiseClient<D> {
  const definition: D = typeof source === "function" ? source.service : source;
  const channelCredentials =
    options.credentials ??
    (options.tls === undefined
      ? grpcCredentials.createInsecure()
      : clientCredentials(options.tls, options.serverRole === undefined ? {} : { serverRole: options.serverRole }));
  const client = new Client(address, channelCredentials, {
    ...RECONNECT_BACKOFF,
    ...(options.credentials === undefined && options.tls !== undefined && dialsIpLiteral(address) ? TLS_IP_TARGET : {}),
    ...options.channelOptions,
    // W3C trace context on every call's metadata, and a CLIENT span, once tracing is started (DESIGN §13).
    // History positions on every call and its status (issue 18: order without clocks).
    interceptors: [traceClientInterceptor, historyClientInterceptor, ...(options.channelOptions?.interceptors ?? [])],
  });
  const defaults: Defaults = { unary: options.deadlineMs ?? 5000, stream: options.streamDeadlineMs };
  const result: Record<string, unknown> = {
    close: () => client.close(),
    raw: client,
    address,
  };
  for (const [name, method] of Object.entries(definition)) {
    if (Object.hasOwn(result, name)) throw new Error(`createClient: method name "${name}" clashes with the client's own`);
    result[name] = makeMethod(client, method, defaults);
  }
  return result as PromiseClient<D>;
}

/**
 * Reconnect backoff of every channel: grpc-js's default (1 s, growing to 120 s) fails calls fast
 * for seconds after a peer that was not up yet (or restarted) starts listening. The stack's peers
 * are on loopback or a compose network, where a short, bounded backoff costs nothing.
 */
export const RECONNECT_BACKOFF = {
  "grpc.initial_reconnect_backoff_ms": 100,
  "grpc.min_reconnect_backoff_ms": 100,
  "grpc.max_reconnect_backoff_ms": 1000,
} as const;

/**
 * TLS to an IP literal (`127.0.0.1:port`): grpc-js would send the IP as the TLS server name, which
 * RFC 6066 forbids (Node warns, DEP0123, in every process). The name sent is `localhost`, which every
 * stack certificate carries; who the server is is checked by its identity, not by this name
 * (see `clientCredentials`).
 */
const TLS_IP_TARGET = { "grpc.ssl_target_name_override": "localhost" } as const;

function dialsIpLiteral(address: string): boolean {
  // One address, or a list of IPv4 ones (`ipv4:h1:p1,h2:p2`: a core and its standbys).
  return (
    /^(ipv4:|ipv6:)?(\d{1,3}(\.\d{1,3}){3}|\[[0-9A-Fa-f:.]+\])(:\d+)?$/.test(address) ||
    /^ipv4:\d{1,3}(\.\d{1,3}){3}:\d+(,\d{1,3}(\.\d{1,3}){3}:\d+)+$/.test(address)
  );
}

interface Defaults {
  readonly unary: number;
  readonly stream: number | undefined;
}

function makeMethod(client: Client, method: AnyMethodDefinition, defaults: Defaults): unknown {
  const { path, requestSerialize: serialize, responseDeserialize: deserialize } = method;
  if (!method.requestStream && !method.responseStream) {
    return (request: unknown, options: CallOptions = {}): Promise<unknown> => {
      const { signal } = options;
      if (signal?.aborted === true) return Promise.reject(abortedError(path));
      return new Promise((resolve, reject) => {
        const onAbort = (): void => call.cancel();
        const call = client.makeUnaryRequest(
          path,
          serialize,
          deserialize,
          request,
          toMetadata(options.metadata),
          callOptions(options.deadlineMs ?? defaults.unary),
          (err, response) => {
            signal?.removeEventListener("abort", onAbort);
            if (err !== null) reject(toDomainError(err));
            else resolve(response);
          },
        );
        signal?.addEventListener("abort", onAbort, { once: true });
      });
    };
  }
  if (!method.requestStream && method.responseStream) {
    return (request: unknown, options: CallOptions = {}): AsyncIterable<unknown> => {
      // The call starts when iteration starts, so an iterable that is never read opens nothing.
      return {
        [Symbol.asyncIterator]: () => {
          if (options.signal?.aborted === true) return rejectingIterator(abortedError(path));
          const call = client.makeServerStreamRequest(
            path,
            serialize,
            deserialize,
            request,
            toMetadata(options.metadata),
            callOptions(options.deadlineMs ?? defaults.stream),
          );
          return readResponses(call, options.signal)[Symbol.asyncIterator]();
        },
      };
    };
  }
  if (method.requestStream && method.responseStream) {
    return (options: CallOptions = {}): BidiStream<unknown, unknown> => {
      const call = client.makeBidiStreamRequest(path, serialize, deserialize, toMetadata(options.metadata), callOptions(options.deadlineMs ?? defaults.stream));
      const { signal } = options;
      const onAbort = (): void => call.cancel();
      if (signal?.aborted === true) call.cancel();
      else if (signal !== undefined) {
        signal.addEventListener("abort", onAbort, { once: true });
        call.once("close", () => signal.removeEventListener("abort", onAbort));
      }
      return {
        send: (message) => write(call, message, path),
        end: () => call.end(),
        responses: readResponses(call, undefined),
        cancel: () => call.cancel(),
      };
    };
  }
  return (options: CallOptions = {}): ClientStream<unknown, unknown> => {
    const { signal } = options;
    const onAbort = (): void => call.cancel();
    let call!: ClientWritableStream<unknown>;
    const response = new Promise<unknown>((resolve, reject) => {
      call = client.makeClientStreamRequest(
        path,
        serialize,
        deserialize,
        toMetadata(options.metadata),
        callOptions(options.deadlineMs ?? defaults.unary),
        (err, res) => {
          signal?.removeEventListener("abort", onAbort);
          if (err !== null) reject(toDomainError(err));
          else resolve(res);
        },
      );
    });
    // A caller that only cancels never awaits `response`; its rejection is reported by end().
    response.catch(() => {});
    if (signal?.aborted === true) call.cancel();
    else signal?.addEventListener("abort", onAbort, { once: true });
    return {
      send: (message) => write(call, message, path),
      end: () => {
        call.end();
        return response;
      },
      cancel: () => call.cancel(),
    };
  };
}

function callOptions(deadlineMs: number | undefined): Partial<GrpcCallOptions> {
  return deadlineMs === undefined ? {} : { deadline: Date.now() + deadlineMs };
}

function toMetadata(metadata: CallOptions["metadata"]): Metadata {
  if (metadata instanceof Metadata) return metadata;
  const result = new Metadata();
  if (metadata !== undefined) for (const [key, value] of Object.entries(metadata)) result.set(key, value);
  return result;
}

function abortedError(path: string): DomainError {
  return new DomainError(Code.CANCELLED, "CANCELLED", `${path} was cancelled before it started`);
}

function rejectingIterator(err: unknown): AsyncIterator<never> {
  return { next: () => Promise.reject(err) };
}

/** Writes one request, resolving at once unless the stream asks to wait for 'drain'. */
function write(call: ClientWritableStream<unknown> | ClientDuplexStream<unknown, unknown>, message: unknown, path: string): Promise<void> {
  if (!call.writable) {
    return Promise.reject(new DomainError(Code.FAILED_PRECONDITION, "STREAM_CLOSED", `${path}: the request stream is closed`));
  }
  if (call.write(message)) return Promise.resolve();
  return new Promise<void>((resolve, reject) => {
    const onDrain = (): void => {
      call.off("close", onClose);
      resolve();
    };
    const onClose = (): void => {
      call.off("drain", onDrain);
      reject(new DomainError(Code.CANCELLED, "STREAM_CLOSED", `${path}: the call ended before the request was sent`));
    };
    call.once("drain", onDrain);
    call.once("close", onClose);
  });
}

/**
 * The responses of a call, errors rebuilt as DomainError; leaving the loop early (or aborting
 * `signal`) cancels the call, which is how a client stops a server stream.
 */
async function* readResponses<Res>(
  call: ClientReadableStream<Res> | ClientDuplexStream<unknown, Res>,
  signal: AbortSignal | undefined,
): AsyncGenerator<Res, void, undefined> {
  // grpc-js reports the final status as an 'error' event; after the loop is left nobody listens,
  // and an unheard 'error' would crash the process.
  call.on("error", () => {});
  const onAbort = (): void => call.cancel();
  signal?.addEventListener("abort", onAbort, { once: true });
  try {
    for await (const message of call) yield message as Res;
  } catch (err) {
    throw toDomainError(err);
  } finally {
    signal?.removeEventListener("abort", onAbort);
    call.cancel();
  }
}

/**
 * Waits until the client's channel is connected.
 * @throws DomainError UNAVAILABLE when it is not ready within `deadlineMs`.
 */
export function waitForReady(client: Client | { readonly raw: Client }, deadlineMs = 5000): Promise<void> {
  const raw = client instanceof Client ? client : client.raw;
  return new Promise((resolve, reject) => {
    raw.waitForReady(Date.now() + deadlineMs, (err) => {
      if (err === undefined || err === null) resolve();
      else {
        reject(
          new DomainError(Code.UNAVAILABLE, "UNAVAILABLE", `${raw.getChannel().getTarget()} not ready within ${deadlineMs} ms`, {
            cause: err,
          }),
        );
      }
    });
  });
}

import type {
  Deadline,
  Metadata,
  MethodDefinition,
  ServerDuplexStream,
  ServerReadableStream,
  ServerUnaryCall,
  ServerWritableStream,
  UntypedServiceImplementation,
  sendUnaryData,
} from "@grpc/grpc-js";
import { Code, DomainError } from "@ioasid/errors";
import type { Logger } from "pino";
import type { Readable, Writable } from "node:stream";
import { assertDecoded } from "./guard-decoding.js";
import { toGrpcStatus } from "./to-grpc-status.js";
import { traceServerMethod } from "./trace-calls.js";

/**
 * One method of a generated service definition (ts-proto `outputServices=grpc-js` emits these).
 * The `any` is contained here: a definition's serializers take its own message types, which are not
 * assignable to a wider parameter type.
 */
// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type AnyMethodDefinition = MethodDefinition<any, any>;

/** A generated service definition: camelCase method name → method definition. */
export type AnyServiceDefinition = { readonly [method: string]: AnyMethodDefinition };

/** The request message type of a method definition. */
export type RequestOf<M> = M extends { requestDeserialize: (bytes: Buffer) => infer Req } ? Req : never;

/** The response message type of a method definition. */
export type ResponseOf<M> = M extends { responseSerialize: (value: infer Res) => Buffer } ? Res : never;

/** What a handler knows about the call it serves. */
export interface CallContext {
  /** Request metadata (headers) sent by the caller. */
  readonly metadata: Metadata;
  /**
   * Aborted when the call ends early: the caller cancelled, went away, or the deadline passed.
   * `signal.reason` is a {@link DomainError} (CANCELLED or DEADLINE_EXCEEDED).
   */
  readonly signal: AbortSignal;
  /** The caller's deadline, or undefined when the call has none. */
  readonly deadline: Date | undefined;
  /** The caller's address, e.g. `ipv4:127.0.0.1:53012`. */
  readonly peer: string;
  /** Full method path, e.g. `/ioasid.testing.v1.EchoService/Echo`. */
  readonly method: string;
}

/**
 * Sends one response message of a stream. Returns a promise when the transport is applying
 * backpressure (await it before sending more); rejects with the abort reason once the call is over.
 */
export type Send<Res> = (message: Res) => Promise<void> | void;

/** Handler of a unary method: one request, one response. */
export type UnaryHandler<Req, Res> = (request: Req, ctx: CallContext) => Promise<Res> | Res;
/** Handler of a server-streaming method: the stream ends when the returned promise resolves. */
export type ServerStreamHandler<Req, Res> = (request: Req, ctx: CallContext, send: Send<Res>) => Promise<void>;
/** Handler of a client-streaming method: reads every request, then answers once. */
export type ClientStreamHandler<Req, Res> = (requests: AsyncIterable<Req>, ctx: CallContext) => Promise<Res>;
/** Handler of a bidirectional method: the response stream ends when the returned promise resolves. */
export type BidiStreamHandler<Req, Res> = (requests: AsyncIterable<Req>, ctx: CallContext, send: Send<Res>) => Promise<void>;

/** The handler type that serves method definition `M`, chosen by its streaming flags. */
export type MethodHandler<M> = M extends { requestStream: true; responseStream: true }
  ? BidiStreamHandler<RequestOf<M>, ResponseOf<M>>
  : M extends { requestStream: true }
    ? ClientStreamHandler<RequestOf<M>, ResponseOf<M>>
    : M extends { responseStream: true }
      ? ServerStreamHandler<RequestOf<M>, ResponseOf<M>>
      : UnaryHandler<RequestOf<M>, ResponseOf<M>>;

/** Promise-based handlers for every method of service definition `D` (camelCase keys). */
export type ServiceHandlers<D> = { readonly [K in keyof D]: MethodHandler<D[K]> };

/** Options of {@link adaptService}. */
export interface AdaptServiceOptions {
  /** Records internal errors (their causes never reach the caller) and, at debug, domain errors. */
  readonly logger: Logger;
}

/**
 * The fully qualified name of the service a generated definition describes
 * (`ioasid.testing.v1.EchoService`), taken from its method paths.
 * @throws Error when the definition has no methods.
 */
export function serviceNameOf(definition: AnyServiceDefinition): string {
  const first = Object.values(definition)[0];
  if (first === undefined) throw new Error("service definition has no methods");
  return first.path.split("/")[1] ?? first.path;
}

/**
 * Adapts promise-based handlers to the callback/stream API of grpc-js: the one place where thrown
 * errors become gRPC statuses ({@link toGrpcStatus}), so handlers never build a status by hand.
 * Served with a definition passed through `guardDecoding`, a request that does not decode
 * answers INVALID_ARGUMENT `REQUEST_UNDECODABLE` before any handler runs.
 * Each handler gets a {@link CallContext} whose `signal` follows cancellation and the deadline.
 *
 * @throws Error at adapt time when `handlers` names a method the definition lacks, or lacks one.
 * @example
 * server.addService(testing.EchoServiceService, adaptService(testing.EchoServiceService, {
 *   echo: async (req) => ({ payload: req.payload }), …
 * }, { logger }));
 */
export function adaptService<D extends AnyServiceDefinition>(
  definition: D,
  handlers: ServiceHandlers<D>,
  options: AdaptServiceOptions,
): UntypedServiceImplementation {
  const serviceName = serviceNameOf(definition);
  const known = Object.keys(definition);
  for (const name of Object.keys(handlers)) {
    if (!Object.hasOwn(definition, name)) {
      throw new Error(`adaptService: "${name}" is not a method of ${serviceName} (methods: ${known.join(", ")})`);
    }
  }
  const impl: UntypedServiceImplementation = {};
  for (const name of known) {
    const method = definition[name] as AnyMethodDefinition;
    const handler: unknown = (handlers as Record<string, unknown>)[name];
    if (typeof handler !== "function") {
      throw new Error(`adaptService: no handler for ${serviceName}.${name}`);
    }
    // A SERVER span per call once tracing is started (DESIGN §13); the handler itself otherwise.
    impl[name] = traceServerMethod(method, adaptMethod(method, handler as (...args: never[]) => unknown, options.logger));
  }
  return impl;
}

// Handlers are stored untyped after the mapped-type check in adaptService; each branch below
// calls one with the arguments its streaming kind promises.
type LooseHandler = (...args: unknown[]) => unknown;

function adaptMethod(method: AnyMethodDefinition, handlerFn: (...args: never[]) => unknown, logger: Logger): UntypedServiceImplementation[string] {
  const handler = handlerFn as unknown as LooseHandler;
  const path = method.path;
  if (!method.requestStream && !method.responseStream) {
    return (call: ServerUnaryCall<unknown, unknown>, callback: sendUnaryData<unknown>) => {
      const ctx = new ServerCallContext(call, path);
      invoke(() => handler(assertDecoded(call.request), ctx)).then(
        (response) => {
          ctx.dispose();
          callback(null, response);
        },
        (err: unknown) => {
          ctx.dispose();
          callback(toGrpcStatus(err, { logger, method: path }));
        },
      );
    };
  }
  if (method.requestStream && !method.responseStream) {
    return (call: ServerReadableStream<unknown, unknown>, callback: sendUnaryData<unknown>) => {
      const ctx = new ServerCallContext(call, path);
      const requests = readRequests(call, ctx.signal);
      invoke(() => handler(requests, ctx)).then(
        (response) => {
          ctx.dispose();
          callback(null, response);
        },
        (err: unknown) => {
          ctx.dispose();
          callback(toGrpcStatus(err, { logger, method: path }));
        },
      );
    };
  }
  if (!method.requestStream && method.responseStream) {
    return (call: ServerWritableStream<unknown, unknown>) => {
      const ctx = new ServerCallContext(call, path);
      const sender = createSender(call, ctx.signal);
      invoke(() => handler(assertDecoded(call.request), ctx, sender.send)).then(
        () => finishStream(call, ctx, sender),
        (err: unknown) => failStream(call, ctx, sender, err, logger, path),
      );
    };
  }
  return (call: ServerDuplexStream<unknown, unknown>) => {
    const ctx = new ServerCallContext(call, path);
    const sender = createSender(call, ctx.signal);
    const requests = readRequests(call, ctx.signal);
    invoke(() => handler(requests, ctx, sender.send)).then(
      () => finishStream(call, ctx, sender),
      (err: unknown) => failStream(call, ctx, sender, err, logger, path),
    );
  };
}

/** Calls `fn`, turning a synchronous throw into a rejection. */
function invoke(fn: () => unknown): Promise<unknown> {
  try {
    return Promise.resolve(fn());
  } catch (err) {
    return Promise.reject(err);
  }
}

interface ServerCallLike {
  readonly metadata: Metadata;
  readonly cancelled: boolean;
  getDeadline(): Deadline;
  getPeer(): string;
  on(event: "cancelled", listener: () => void): unknown;
}

/** A cancellation this close to the deadline is taken for the deadline (see `#arm`). */
const DEADLINE_SLACK_MS = 50;

/**
 * The {@link CallContext} of one call. `signal` (its AbortController, deadline timer and cancel
 * listener), `deadline` and `peer` are built on first use: most unary handlers never look, and the
 * bare-echo floor of the benchmarks should not pay for them.
 */
class ServerCallContext implements CallContext {
  readonly metadata: Metadata;
  readonly method: string;
  readonly #call: ServerCallLike;
  #controller: AbortController | undefined;
  #timer: NodeJS.Timeout | undefined;
  #disposed = false;

  constructor(call: ServerCallLike, method: string) {
    this.#call = call;
    this.metadata = call.metadata;
    this.method = method;
  }

  get peer(): string {
    return this.#call.getPeer();
  }

  get deadline(): Date | undefined {
    return toDate(this.#call.getDeadline());
  }

  get signal(): AbortSignal {
    return (this.#controller ?? this.#arm()).signal;
  }

  /** The call is over: stop the deadline timer. */
  dispose(): void {
    this.#disposed = true;
    if (this.#timer !== undefined) clearTimeout(this.#timer);
  }

  #arm(): AbortController {
    const controller = new AbortController();
    this.#controller = controller;
    const deadline = this.deadline;
    const expired = (): DomainError => new DomainError(Code.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", `deadline of ${this.method} passed`);
    const onCancel = (): void => {
      // The caller's own deadline timer fires first and cancels the call (RST_STREAM) a moment
      // before ours, which started when the request arrived: call that an expired deadline.
      const late = deadline !== undefined && Date.now() >= deadline.getTime() - DEADLINE_SLACK_MS;
      controller.abort(late ? expired() : new DomainError(Code.CANCELLED, "CANCELLED", `${this.method} was cancelled by the caller`));
    };
    if (this.#call.cancelled) onCancel();
    else this.#call.on("cancelled", onCancel);
    if (deadline !== undefined && !this.#disposed && !controller.signal.aborted) {
      // grpc-js answers DEADLINE_EXCEEDED itself but does not always tell the handler; abort the
      // signal at the same instant so handler work stops.
      this.#timer = setTimeout(() => controller.abort(expired()), Math.max(0, deadline.getTime() - Date.now()));
      this.#timer.unref();
    }
    return controller;
  }
}

function toDate(deadline: Deadline): Date | undefined {
  if (deadline instanceof Date) return deadline;
  return Number.isFinite(deadline) ? new Date(deadline) : undefined;
}

interface Sender {
  readonly send: Send<unknown>;
  close(): void;
}

function createSender(stream: Writable, signal: AbortSignal): Sender {
  let closed = false;
  const send = (message: unknown): Promise<void> | void => {
    if (closed) throw new Error("send() called after the handler returned");
    if (signal.aborted) return Promise.reject(signal.reason as Error);
    if (stream.write(message)) return;
    // Backpressure: resolve on drain, or reject when the call dies first (no drain will come).
    return new Promise<void>((resolve, reject) => {
      const onDrain = (): void => {
        signal.removeEventListener("abort", onAbort);
        resolve();
      };
      const onAbort = (): void => {
        stream.off("drain", onDrain);
        reject(signal.reason as Error);
      };
      stream.once("drain", onDrain);
      signal.addEventListener("abort", onAbort, { once: true });
    });
  };
  return { send, close: () => void (closed = true) };
}

function finishStream(call: Writable & { cancelled: boolean }, ctx: ServerCallContext, sender: Sender): void {
  sender.close();
  ctx.dispose();
  if (!call.cancelled && !call.writableEnded) call.end();
}

function failStream(call: Writable & { cancelled: boolean }, ctx: ServerCallContext, sender: Sender, err: unknown, logger: Logger, path: string): void {
  sender.close();
  ctx.dispose();
  const status = toGrpcStatus(err, { logger, method: path });
  // grpc-js turns an 'error' event on a server stream into the final status (ServerWritableStreamImpl).
  if (!call.cancelled && !call.writableEnded) call.emit("error", status);
}

/**
 * The request stream as an AsyncIterable that ends with the client's half-close and throws the
 * abort reason when the call is cancelled (grpc-js does not end the readable on cancellation).
 */
async function* readRequests<T>(stream: Readable, signal: AbortSignal): AsyncGenerator<T, void, undefined> {
  // destroyOnReturn: false — a handler that stops reading early may still be sending responses.
  const it = stream.iterator({ destroyOnReturn: false }) as AsyncIterator<T>;
  let rejectAborted: (reason: unknown) => void = () => {};
  const aborted = new Promise<never>((_, reject) => {
    rejectAborted = reject;
  });
  aborted.catch(() => {});
  const onAbort = (): void => rejectAborted(signal.reason);
  if (signal.aborted) onAbort();
  else signal.addEventListener("abort", onAbort, { once: true });
  try {
    for (;;) {
      const next = it.next();
      next.catch(() => {});
      const result = await Promise.race([next, aborted]);
      if (result.done === true) return;
      // A message of the stream that does not decode ends the call with INVALID_ARGUMENT.
      yield assertDecoded(result.value);
    }
  } finally {
    signal.removeEventListener("abort", onAbort);
  }
}

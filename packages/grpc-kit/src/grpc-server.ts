import { readFileSync } from "node:fs";
import {
  Server,
  ServerCredentials,
  type ChannelOptions,
  type ServerInterceptor,
  type ServiceDefinition,
  type UntypedServiceImplementation,
} from "@grpc/grpc-js";
import { loadFileDescriptorSetFromBuffer, loadSync } from "@grpc/proto-loader";
import { ReflectionService } from "@grpc/reflection";
import { descriptorSetPath as defaultDescriptorSetPath } from "@ioasid/proto";
import type { InstanceCredentials, Role } from "@ioasid/security";
import { HealthImplementation, protoPath as healthProtoPath } from "grpc-health-check";
import type { Logger } from "pino";
import { adaptService, serviceNameOf, type AnyServiceDefinition, type ServiceHandlers } from "./adapt-service.js";
import { observeCalls, type CallObserver } from "./call-metrics.js";
import { createLogger } from "./create-logger.js";
import { guardDecoding } from "./guard-decoding.js";
import { historyServerInterceptor } from "./history-calls.js";
import { refuseRoles } from "./refuse-roles.js";
import { serverCredentials } from "./tls.js";

/** Fully qualified name of the standard gRPC health service every {@link GrpcServer} serves. */
export const HEALTH_SERVICE_NAME = "grpc.health.v1.Health";

/** Serving status of the gRPC health protocol (grpc.health.v1), as a closed set. */
export const ServingStatus = {
  UNKNOWN: "UNKNOWN",
  SERVING: "SERVING",
  NOT_SERVING: "NOT_SERVING",
  /** Only from a Watch/Check of a name the server does not know. */
  SERVICE_UNKNOWN: "SERVICE_UNKNOWN",
} as const;
export type ServingStatus = (typeof ServingStatus)[keyof typeof ServingStatus];

/** A service definition's identity: the path of its first method (`/grpc.reflection.v1.ServerReflection/…`). */
function serviceKey(def: ServiceDefinition): string {
  return Object.values(def)
    .map((m) => m.path)
    .sort()
    .join(",");
}

/** Options of {@link createGrpcServer}. */
export interface GrpcServerOptions {
  /** Name of the process's service (`ioasid-core`), in every log line. */
  readonly service: string;
  /** @default createLogger(service) */
  readonly logger?: Logger;
  /**
   * Server reflection over a binary FileDescriptorSet; `false` turns it off.
   * @default { descriptorSetPath } of `@ioasid/proto` (every contract of the project)
   */
  readonly reflection?: false | { readonly descriptorSetPath: string };
  /** grpc-js channel options (message sizes, keepalive…). */
  readonly channelOptions?: ChannelOptions;
  /**
   * The role instance's credentials (`loadCredentials`): the server speaks TLS and requires a client
   * certificate signed by the stack CA (DESIGN §11). @default none: plaintext, no client identity
   */
  readonly tls?: InstanceCredentials;
  /**
   * grpc-js server interceptors, run on every call before its handler (the core's authorization
   * by the caller's role). Health and reflection calls go through them too.
   */
  readonly interceptors?: readonly ServerInterceptor[];
  /**
   * With `tls`: callers whose certificate names one of these roles are refused (PERMISSION_DENIED
   * `ROLE_NOT_ALLOWED`) before any handler — the roles' services refuse VMMs ("VMMs reach only
   * VFIO", DESIGN §11). @default none
   */
  readonly refuseRoles?: readonly Role[];
}

/**
 * A gRPC server of one ioasid-fabric process: the services it adds (through {@link adaptService},
 * so thrown errors become statuses), plus the standard health service (overall `""` and one entry
 * per added service: SERVING once listening, NOT_SERVING from the start of shutdown) and server
 * reflection. Create it with {@link createGrpcServer}.
 */
export class GrpcServer {
  /** The underlying grpc-js server (for what this wrapper does not cover). */
  readonly raw: Server;
  /** The server's logger. */
  readonly logger: Logger;
  /** Name of the process's service, as given in the options. */
  readonly service: string;
  readonly #health = new HealthImplementation({ "": "NOT_SERVING" });
  readonly #statuses = new Map<string, ServingStatus>([["", ServingStatus.NOT_SERVING]]);
  readonly #serviceNames: string[] = [];
  readonly #reflection: NonNullable<GrpcServerOptions["reflection"]>;
  readonly #tls: InstanceCredentials | undefined;
  #port: number | undefined;
  #host: string | undefined;
  #listening: Promise<number> | undefined;
  #shutdown: Promise<void> | undefined;
  #callObserver: CallObserver | undefined;

  constructor(options: GrpcServerOptions) {
    this.service = options.service;
    const logger = options.logger ?? createLogger(options.service);
    // The testkit and operators find a process's lines by "service"; make sure it is there.
    this.logger = "service" in logger.bindings() ? logger : logger.child({ service: options.service });
    const interceptors = [
      // First: it sees the status of every call, refusals by the interceptors below included.
      observeCalls(() => this.#callObserver),
      ...(options.refuseRoles === undefined || options.refuseRoles.length === 0 ? [] : [refuseRoles(options.refuseRoles, this.logger)]),
      ...(options.interceptors ?? []),
      // History positions in from each call's metadata, out with its status (issue 18: order
      // without clocks). Last, nearest the handler: the interceptors before it see grpc-js's own
      // call (an authorization reads the connection from it, connectionOf).
      historyServerInterceptor,
    ];
    this.raw = new Server({ ...options.channelOptions, interceptors });
    this.#tls = options.tls;
    this.#reflection = options.reflection ?? { descriptorSetPath: defaultDescriptorSetPath };
    this.#health.addToServer(this.raw);
  }

  /**
   * Adds a generated service with promise-based handlers (see {@link adaptService}).
   * @throws Error after {@link GrpcServer.listen}, or when the handlers do not match the definition.
   */
  addService<D extends AnyServiceDefinition>(definition: D, handlers: ServiceHandlers<D>): this {
    if (this.#listening !== undefined) throw new Error("addService() after listen()");
    const name = serviceNameOf(definition);
    // Undecodable bytes answer INVALID_ARGUMENT, not grpc-js's INTERNAL (DESIGN §8, issue 14).
    const guarded = guardDecoding(definition);
    this.raw.addService(guarded, adaptService(guarded, handlers, { logger: this.logger }));
    this.#serviceNames.push(name);
    this.setServingStatus(ServingStatus.NOT_SERVING, name);
    return this;
  }

  /**
   * Tells `observer` how every call from now on ends (method, status code, duration): the
   * process's gRPC metrics (`createGrpcMetrics`). May be set before or after {@link GrpcServer.listen}.
   */
  observeCalls(observer: CallObserver): this {
    this.#callObserver = observer;
    return this;
  }

  /** Fully qualified names of the services added so far (health and reflection not included). */
  get serviceNames(): readonly string[] {
    return [...this.#serviceNames];
  }

  /**
   * Binds `host:port`, marks every service SERVING and logs the `"listening"` line the testkit
   * waits for: `{"msg":"listening","address":"127.0.0.1:<port>","service":…}`.
   * @param port 0 picks an ephemeral port. @default 0
   * @param host @default "127.0.0.1"
   * @returns the bound port.
   * @throws Error when the address cannot be bound or the descriptor set cannot be read.
   */
  listen(host = "127.0.0.1", port = 0): Promise<number> {
    this.#listening ??= this.#bind(host, port);
    return this.#listening;
  }

  async #bind(host: string, port: number): Promise<number> {
    const reflection = this.#reflection;
    if (reflection !== false) this.#addReflection(reflection.descriptorSetPath);
    const target = formatAddress(host, port);
    const bound = await new Promise<number>((resolve, reject) => {
      const credentials = this.#tls === undefined ? ServerCredentials.createInsecure() : serverCredentials(this.#tls);
      this.raw.bindAsync(target, credentials, (err, p) => {
        if (err !== null) reject(new Error(`cannot listen on ${target}: ${err.message}`, { cause: err }));
        else resolve(p);
      });
    });
    this.#port = bound;
    this.#host = host;
    for (const name of ["", ...this.#serviceNames]) this.setServingStatus(ServingStatus.SERVING, name);
    this.logger.info({ address: this.address, ...(this.#tls === undefined ? {} : { tls: "mtls" }) }, "listening");
    return bound;
  }

  #addReflection(path: string): void {
    let buffer: Buffer;
    try {
      buffer = readFileSync(path);
    } catch (err) {
      throw new Error(`cannot read the descriptor set for reflection at ${path} (run \`npm run gen\`)`, { cause: err });
    }
    const services = [...this.#serviceNames, HEALTH_SERVICE_NAME];
    // Parsing the descriptor set costs about a second of CPU at every start (more on a busy machine)
    // and only a reflection client needs it: the reflection services are added at once (their
    // definitions come from an empty ReflectionService), and the real one is built at the first call.
    let real: Map<string, UntypedServiceImplementation> | undefined;
    const handlersOf = (service: ReflectionService): Map<string, UntypedServiceImplementation> => {
      const byService = new Map<string, UntypedServiceImplementation>();
      service.addToServer({
        addService: (def: ServiceDefinition, impl: UntypedServiceImplementation) => byService.set(serviceKey(def), impl),
      } as unknown as Server);
      return byService;
    };
    const build = (): Map<string, UntypedServiceImplementation> => {
      real ??= handlersOf(new ReflectionService({ ...loadFileDescriptorSetFromBuffer(buffer), ...loadSync(healthProtoPath) }, { services }));
      return real;
    };
    const shim = { addService: (def: ServiceDefinition, impl: UntypedServiceImplementation) => this.raw.addService(def, lazyImpl(def, impl)) };
    const lazyImpl = (def: ServiceDefinition, impl: UntypedServiceImplementation): UntypedServiceImplementation =>
      Object.fromEntries(
        Object.keys(impl).map((method) => [
          method,
          ((call: unknown, callback?: unknown) =>
            (build().get(serviceKey(def))![method] as (c: unknown, cb?: unknown) => void)(call, callback)) as UntypedServiceImplementation[string],
        ]),
      );
    new ReflectionService({}, { services }).addToServer(shim as unknown as Server);
  }

  /** Whether the server requires mTLS (it was given credentials). */
  get secure(): boolean {
    return this.#tls !== undefined;
  }

  /** The bound port, once listening. */
  get port(): number | undefined {
    return this.#port;
  }

  /** `host:port` clients connect to, once listening. */
  get address(): string | undefined {
    return this.#host === undefined || this.#port === undefined ? undefined : formatAddress(this.#host, this.#port);
  }

  /**
   * Sets what the health service reports for `service` (`""` = the whole server): e.g. NOT_SERVING
   * while a dependency (NATS) is unreachable.
   */
  setServingStatus(status: Exclude<ServingStatus, "SERVICE_UNKNOWN">, service = ""): void {
    this.#statuses.set(service, status);
    this.#health.setStatus(service, status);
  }

  /** What the health service currently reports for `service` (`""` = the whole server). */
  servingStatus(service = ""): ServingStatus {
    return this.#statuses.get(service) ?? ServingStatus.SERVICE_UNKNOWN;
  }

  /**
   * Graceful shutdown: health NOT_SERVING everywhere, refuse new calls, let calls in flight finish;
   * after `graceMs` cancel whatever is still running. Idempotent (later calls share the first).
   * @param graceMs @default 5000
   */
  shutdown(graceMs = 5000): Promise<void> {
    this.#shutdown ??= this.#stop(graceMs);
    return this.#shutdown;
  }

  async #stop(graceMs: number): Promise<void> {
    for (const name of this.#statuses.keys()) this.setServingStatus(ServingStatus.NOT_SERVING, name);
    this.logger.info({ graceMs }, "shutting down");
    const forced = await new Promise<boolean>((resolve) => {
      const timer = setTimeout(() => {
        this.raw.forceShutdown();
        resolve(true);
      }, graceMs);
      this.raw.tryShutdown(() => {
        clearTimeout(timer);
        resolve(false);
      });
    });
    this.logger.info({ forced }, "stopped");
  }
}

/**
 * Creates a {@link GrpcServer} (health and reflection included; add services, then listen).
 *
 * @example
 * const server = createGrpcServer({ service: "ioasid-core", logger })
 *   .addService(core.CoreServiceService, handlers);
 * await server.listen(config.address.host, config.address.port);
 * runUntilSignal(server, { logger });
 */
export function createGrpcServer(options: GrpcServerOptions): GrpcServer {
  return new GrpcServer(options);
}

/** `host:port`, with IPv6 literals in brackets (`[::1]:50051`). */
export function formatAddress(host: string, port: number): string {
  return host.includes(":") && !host.startsWith("[") ? `[${host}]:${port}` : `${host}:${port}`;
}

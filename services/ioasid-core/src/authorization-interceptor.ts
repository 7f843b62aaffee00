import { Metadata, ServerInterceptingCall, type ServerInterceptor } from "@grpc/grpc-js";
import { callerIdentity, readAuditNote, toGrpcStatus } from "@ioasid/grpc-kit";
import { core } from "@ioasid/proto";
import { formatIdentity } from "@ioasid/security";
import type { Logger } from "pino";
import { authorize, type AuthorizationView, type CoreMethod } from "./authorize.js";
import type { OperatorAudit } from "./operation.js";

/** Options of {@link createAuthorizationInterceptor}. */
export interface AuthorizationInterceptorOptions {
  readonly view: AuthorizationView;
  readonly logger: Logger;
}

/**
 * The audit of each request object an audited call passed on (keyed by the decoded request itself,
 * which grpc-js hands to the handler unchanged): set only here, after authentication, so a client
 * cannot forge it — metadata it sends adds a reason, never an identity.
 */
const AUDITS = new WeakMap<object, OperatorAudit>();

/**
 * The operator audit the authorization interceptor attached to this request (an operator's
 * force-release Put, RegisterAllocator, UnregisterAllocator), or undefined: the handler puts it into
 * the operation, whose history then carries the audit record (audit-record.ts).
 */
export function operatorAuditOf(request: object): OperatorAudit | undefined {
  return AUDITS.get(request);
}

/** CoreService method path (`/ioasid.core.v1.CoreService/CreateSet`) → method name (`createSet`). */
const CORE_METHODS: ReadonlyMap<string, CoreMethod> = new Map(
  (Object.entries(core.CoreServiceService) as Array<[CoreMethod, { path: string }]>).map(([name, def]) => [def.path, name]),
);

/**
 * The core's authorization in its gRPC layer: a grpc-js server interceptor that reads the caller
 * from its client certificate and applies {@link authorize} to each decoded CoreService request
 * before it reaches the handler. A refused call is answered with the refusal and its request is
 * never passed on (nor its half-close): the handler does not run, so nothing changes and nothing is
 * logged as an operation. Health and reflection are not CoreService and pass (the TLS handshake has
 * already required a certificate of the stack CA).
 *
 * Why an interceptor rather than a wrapper of the handlers: the identity is the connection's (the
 * auth context), which grpc-kit's handler context does not carry; and refusing before the handler
 * keeps the "refused call changes nothing" rule independent of what a handler does first.
 */
export function createAuthorizationInterceptor(options: AuthorizationInterceptorOptions): ServerInterceptor {
  const { view, logger } = options;
  return (descriptor, call) => {
    const method = CORE_METHODS.get(descriptor.path);
    if (method === undefined) return new ServerInterceptingCall(call);
    let refused = false;
    let metadata: Metadata | undefined;
    return new ServerInterceptingCall(call, {
      start: (next) =>
        next({
          onReceiveMetadata: (m, pass) => {
            metadata = m;
            pass(m);
          },
          onReceiveMessage: (message, pass) => {
            if (refused) return;
            const caller = callerIdentity(call);
            try {
              const decision = authorize(method, message, caller, view);
              if (decision.audit !== undefined && caller !== undefined && typeof message === "object" && message !== null) {
                const note = readAuditNote(metadata ?? new Metadata());
                const audit: OperatorAudit = { operator: formatIdentity(caller), reason: note.reason, onBehalfOf: note.onBehalfOf };
                AUDITS.set(message, audit);
                logger.warn({ audit: decision.audit, method: descriptor.path, ...audit }, "audited operator call");
              }
            } catch (err) {
              refused = true;
              logger.warn(
                { method: descriptor.path, caller: caller === undefined ? undefined : `${caller.role}/${caller.instance}`, err: String(err) },
                "call refused",
              );
              call.sendStatus(toGrpcStatus(err, { logger, method: descriptor.path }));
              return;
            }
            pass(message);
          },
          onReceiveHalfClose: (pass) => {
            if (!refused) pass();
          },
        }),
    });
  };
}

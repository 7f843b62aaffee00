import { ServerInterceptingCall, status, type ServerInterceptor } from "@grpc/grpc-js";
import { callerIdentity, toGrpcStatus } from "@ioasid/grpc-kit";
import { core } from "@ioasid/proto";
import type { RoleIdentity } from "@ioasid/security";
import type { Logger } from "pino";
import { authorize, type AuditKind, type AuthorizationView, type CoreMethod } from "./authorize.js";

/** A call that succeeded and must leave an audit record (see {@link AuditKind}). */
export interface AuditedCall {
  readonly kind: AuditKind;
  readonly method: CoreMethod;
  readonly caller: RoleIdentity;
  /** The decoded request. */
  readonly request: unknown;
}

/** Options of {@link createAuthorizationInterceptor}. */
export interface AuthorizationInterceptorOptions {
  readonly view: AuthorizationView;
  readonly logger: Logger;
  /** Called once an audited call has succeeded (its status is OK), before the status is sent. */
  readonly onAudited: (call: AuditedCall) => void;
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
  const { view, logger, onAudited } = options;
  return (descriptor, call) => {
    const method = CORE_METHODS.get(descriptor.path);
    if (method === undefined) return new ServerInterceptingCall(call);
    let refused = false;
    let audited: AuditedCall | undefined;
    return new ServerInterceptingCall(call, {
      start: (next) =>
        next({
          onReceiveMessage: (message, pass) => {
            if (refused) return;
            const caller = callerIdentity(call);
            try {
              const decision = authorize(method, message, caller, view);
              if (decision.audit !== undefined && caller !== undefined) audited = { kind: decision.audit, method, caller, request: message };
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
      sendStatus: (s, pass) => {
        if (audited !== undefined && s.code === status.OK) {
          try {
            onAudited(audited);
          } catch (err) {
            logger.error({ err: String(err), method: descriptor.path }, "audit record failed");
          }
        }
        pass(s);
      },
    });
  };
}

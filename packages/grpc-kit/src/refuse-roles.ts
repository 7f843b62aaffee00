import { ServerInterceptingCall, type ServerInterceptor } from "@grpc/grpc-js";
import { Code, DomainError } from "@ioasid/errors";
import { formatIdentity, type Role } from "@ioasid/security";
import type { Logger } from "pino";
import { callerIdentity } from "./tls.js";
import { toGrpcStatus } from "./to-grpc-status.js";

/**
 * A server interceptor that refuses callers of the given roles (their client certificate's
 * identity) with PERMISSION_DENIED `ROLE_NOT_ALLOWED`, before the handler reads the request. The
 * roles' own services use it for VMMs: "VMMs reach only VFIO" (DESIGN §11) — a guest's VMM naming
 * another VM's vm_id, mdev or device at KVM, VDCM or the IOMMU would bypass VFIO's capability.
 * Without mTLS there is no caller identity and nothing is refused.
 */
export function refuseRoles(roles: readonly Role[], logger: Logger): ServerInterceptor {
  const refused = new Set<Role>(roles);
  return (descriptor, call) => {
    let stopped = false;
    return new ServerInterceptingCall(call, {
      start: (next) =>
        next({
          onReceiveMessage: (message, pass) => {
            if (stopped) return;
            const caller = callerIdentity(call);
            if (caller !== undefined && refused.has(caller.role)) {
              stopped = true;
              const err = new DomainError(
                Code.PERMISSION_DENIED,
                "ROLE_NOT_ALLOWED",
                `${descriptor.path} is not reachable with the credential of ${formatIdentity(caller)}: VMMs reach only VFIO`,
              );
              logger.warn({ method: descriptor.path, caller: formatIdentity(caller) }, "call refused");
              call.sendStatus(toGrpcStatus(err, { logger, method: descriptor.path }));
              return;
            }
            pass(message);
          },
          onReceiveHalfClose: (pass) => {
            if (!stopped) pass();
          },
        }),
    });
  };
}

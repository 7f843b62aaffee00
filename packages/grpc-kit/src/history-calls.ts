import { InterceptingCall, Metadata, ServerInterceptingCall, type Interceptor, type ServerInterceptor } from "@grpc/grpc-js";
import { decodePositions, encodePositions, noteReceived, POSITION_METADATA, processPositions } from "@ioasid/trace";

// Order without clocks on gRPC (issue 18): a call carries the caller's history positions in its
// metadata, its status the server's in the trailers. Records the server makes while handling it
// then follow the caller's records before the call, and records the caller makes after the answer
// follow the server's records before it (a VDCM's vdev_write after the core's get it asked for; the
// core's put after the VDCM's clear that released it). A process that records nothing sends nothing.

function note(metadata: Metadata | undefined): void {
  const values = metadata?.get(POSITION_METADATA);
  if (values === undefined) return;
  for (const v of values) if (typeof v === "string") noteReceived(decodePositions(v));
}

function attach(metadata: Metadata): Metadata {
  const links = processPositions();
  if (links.length > 0) metadata.set(POSITION_METADATA, encodePositions(links));
  return metadata;
}

/** The client side: positions out with the request, the server's in from the trailers. */
export const historyClientInterceptor: Interceptor = (options, nextCall) =>
  new InterceptingCall(nextCall(options), {
    start(metadata, listener, next) {
      attach(metadata);
      next(metadata, {
        onReceiveStatus(status, nextStatus) {
          note(status.metadata);
          nextStatus(status);
        },
      });
    },
  });

/** The server side: the caller's positions in from the metadata, this process's out with the status. */
export const historyServerInterceptor: ServerInterceptor = (_descriptor, call) =>
  new ServerInterceptingCall(call, {
    start(next) {
      next({
        onReceiveMetadata(metadata, mdNext) {
          note(metadata);
          mdNext(metadata);
        },
      });
    },
    sendStatus(status, next) {
      // Taken at the end of the call: the records its handling made are covered.
      next({ ...status, metadata: attach(status.metadata ?? new Metadata()) });
    },
  });

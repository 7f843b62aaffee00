import { Code, DomainError, codeName } from "@ioasid/errors";
import { testing } from "@ioasid/proto";
import type { ServiceHandlers } from "./adapt-service.js";
import { createGrpcServer, type GrpcServer, type GrpcServerOptions } from "./grpc-server.js";

/**
 * Handlers of the bare ioasid.testing.v1.EchoService: Echo and EchoStream answer with what they
 * were sent, Fail throws the DomainError it was asked for. The benchmarks' floor and the grpc-kit
 * tests' reference service.
 */
export function createEchoHandlers(): ServiceHandlers<typeof testing.EchoServiceService> {
  return {
    echo: (request) => ({ payload: request.payload }),
    echoStream: async (requests, _ctx, send) => {
      for await (const request of requests) await send({ payload: request.payload });
    },
    fail: (request) => {
      if (!Number.isInteger(request.code) || request.code < Code.CANCELLED || request.code > Code.UNAUTHENTICATED) {
        throw new DomainError(Code.INVALID_ARGUMENT, "INVALID_CODE", `Fail needs an error code 1..16, got ${request.code}`);
      }
      const code = request.code as Code;
      throw new DomainError(code, request.reason === "" ? codeName(code) : request.reason, request.message);
    },
  };
}

/**
 * Creates a {@link GrpcServer} serving only the EchoService (plus health and reflection).
 * @example
 * const server = createEchoServer();
 * const port = await server.listen();
 */
export function createEchoServer(options: Partial<GrpcServerOptions> = {}): GrpcServer {
  return createGrpcServer({ service: "echo", ...options }).addService(testing.EchoServiceService, createEchoHandlers());
}

#!/usr/bin/env node
// The bare gRPC service the benchmarks measure their floor against: the project's grpc-kit server
// with the testing EchoService, in its own process like a real service. With IOASID_CREDENTIALS_DIR
// (a role instance's certificate) it serves mTLS, as the services do: the floor of a secure call.
import { createEchoServer, createLogger, loadCredentials } from "@ioasid/grpc-kit";

const tls = loadCredentials(process.env);
const server = createEchoServer({ logger: createLogger("echo", { level: "info" }), reflection: false, ...(tls === undefined ? {} : { tls }) });
await server.listen("127.0.0.1", 0);
process.on("SIGTERM", () => void server.shutdown(500).then(() => process.exit(0)));

#!/usr/bin/env node
// The bare gRPC service the benchmarks measure their floor against: the project's grpc-kit server
// with the testing EchoService, in its own process like a real service.
import { createEchoServer, createLogger } from "@ioasid/grpc-kit";

const server = createEchoServer({ logger: createLogger("echo", { level: "info" }), reflection: false });
await server.listen("127.0.0.1", 0);
process.on("SIGTERM", () => void server.shutdown(500).then(() => process.exit(0)));

#!/usr/bin/env node
// Container health check: `node health-probe.js [host:port] [service]` exits 0 when the gRPC
// health service answers SERVING, 1 otherwise (docker/compose HEALTHCHECK). With IOASID_CREDENTIALS_DIR
// it connects with mTLS as that credential.
import { checkHealth } from "./check-health.js";
import { loadCredentials } from "./tls.js";

const address = process.argv[2] ?? "127.0.0.1:50051";
const service = process.argv[3] ?? "";
try {
  // In a container of a stack with mTLS the probe presents the service's own certificate
  // (IOASID_CREDENTIALS_DIR): every server demands one, health included.
  const tls = loadCredentials(process.env);
  const status = await checkHealth(address, service, { deadlineMs: 2000, ...(tls === undefined ? {} : { client: { tls } }) });
  process.stdout.write(`${address} ${service || "(overall)"}: ${status}\n`);
  process.exit(status === "SERVING" ? 0 : 1);
} catch (err) {
  process.stdout.write(`${address}: ${(err as Error).message}\n`);
  process.exit(1);
}

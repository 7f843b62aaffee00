/**
 * Test harness of ioasid-fabric: a nats-server on an ephemeral port with JetStream in a temp dir
 * (or, with IOASID_TESTKIT_DOCKER=1, in a Docker container through testcontainers),
 * the built services as child processes on ephemeral ports, and the bounded wait that replaces
 * sleeps. Everything it starts is stopped by PID (and killed if the test runner exits first).
 */
export { canConnect } from "./can-connect.js";
export { freePort } from "./free-port.js";
export { spawnManaged, terminate, type ExitStatus, type ManagedChild } from "./managed-child.js";
export { readNatsInfo } from "./read-nats-info.js";
export { natsEnv } from "./nats-env.js";
export { NATS_INSTALL_COMMAND, startNats, type NatsRoleCredentials, type NatsServer, type StartNatsOptions } from "./start-nats.js";
export { dockerRequested, NATS_IMAGE, startNatsContainer, type StartNatsContainerOptions } from "./start-nats-container.js";
export { startNatsCluster, type ClusterNode, type NatsCluster, type NatsClusterPlacement, type StartNatsClusterOptions } from "./start-nats-cluster.js";
export { startService, type ServiceProcess, type StartServiceOptions } from "./start-service.js";
export { continueProcess, stopProcess } from "./stop-process.js";
export { waitFor, type WaitForOptions } from "./wait-for.js";
export { InProcessCore, type InProcessCoreOptions } from "./in-process-core.js";

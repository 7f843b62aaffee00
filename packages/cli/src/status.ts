import { connect } from "@nats-io/transport-node";
import { checkHealth } from "@ioasid/grpc-kit";
import { addressesOf, natsServers } from "./clients.js";
import { alive, type ServiceName, type ServiceRecord, type StackState } from "./stack-state.js";

/** One service of {@link StackStatus}: its record in stack.json and what its health check answered. */
export interface ServiceStatus extends Omit<ServiceRecord, "pid"> {
  readonly name: ServiceName;
  /** null: not started by `up` (an attached stack), or not running under the supervisor now. */
  readonly pid: number | null;
  /** The gRPC health check's answer (`SERVING`, `NOT_SERVING`, …), or `DOWN` when it did not answer. */
  readonly health: string;
  /** Why the health check did not answer. */
  readonly error?: string;
}

/** What `ioasidctl status` found: every process of the stack and whether it is up. */
export interface StackStatus {
  /** NATS accepts a connection, every service answers SERVING, and the supervisor (if any) runs. */
  readonly ok: boolean;
  readonly nats: {
    readonly url: string;
    /** null: external (attached), not ours to watch by PID. */
    readonly pid: number | null;
    readonly external: boolean;
    readonly up: boolean;
    readonly error?: string;
    /** `up --nats-cluster`: each server, whether its process runs (a stack with one down is not ok). */
    readonly cluster?: readonly { readonly name: string; readonly url: string; readonly pid: number | null; readonly running: boolean }[];
  };
  /** null: no supervisor (an attached stack). */
  readonly supervisor: { readonly pid: number | null; readonly running: boolean; readonly log: string } | null;
  readonly services: readonly ServiceStatus[];
}

/**
 * Checks every process of the stack in `state`: a NATS connection (with the operator's credentials
 * on an authenticated stack), each service's gRPC health check (1 s each), the supervisor's PID.
 * Never throws for a process that is down: that is what it reports.
 */
export async function stackStatus(state: StackState): Promise<StackStatus> {
  // PIDs are null rather than absent below: JSON.stringify drops undefined, and a script should find the key.
  const addresses = addressesOf(state);
  let natsError: string | undefined;
  try {
    const nc = await connect({ servers: natsServers(state.natsUrl), name: "ioasidctl-status", timeout: 1000, reconnect: false, ...addresses.natsAuth });
    await nc.close();
  } catch (err) {
    natsError = (err as Error).message;
  }
  const tls = addresses.tls;
  const services = await Promise.all(
    (Object.entries(state.services) as [ServiceName, ServiceRecord][]).map(async ([name, record]): Promise<ServiceStatus> => {
      try {
        const health = await checkHealth(record.address, "", { deadlineMs: 1000, ...(tls === undefined ? {} : { client: { tls } }) });
        return { name, ...record, pid: record.pid ?? null, health };
      } catch (err) {
        return { name, ...record, pid: record.pid ?? null, health: "DOWN", error: (err as Error).message };
      }
    }),
  );
  const supervisor =
    state.supervisor === undefined ? null : { pid: state.supervisor.pid ?? null, running: alive(state.supervisor.pid), log: state.supervisor.log };
  const nats = {
    url: state.natsUrl,
    pid: state.nats.pid ?? null,
    external: state.nats.pid === undefined,
    up: natsError === undefined,
    ...(natsError === undefined ? {} : { error: natsError }),
    ...(state.natsCluster === undefined
      ? {}
      : { cluster: state.natsCluster.map((n) => ({ name: n.name, url: `nats://127.0.0.1:${n.port}`, pid: n.pid ?? null, running: alive(n.pid) })) }),
  };
  const ok =
    nats.up && (nats.cluster?.every((n) => n.running) ?? true) && services.every((s) => s.health === "SERVING") && (supervisor === null || supervisor.running);
  return { ok, nats, supervisor, services };
}

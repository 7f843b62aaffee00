import { connect } from "@nats-io/transport-node";
import { DEFAULT_PREFIX } from "@ioasid/bus";
import { checkHealth } from "@ioasid/grpc-kit";
import { addressesOf, natsServers } from "./clients.js";
import { alive, STANDBY_CORE, type ServiceRecord, type StackState, type SupervisedName } from "./stack-state.js";

/** One service of {@link StackStatus}: its record in stack.json and what its health check answered. */
export interface ServiceStatus extends Omit<ServiceRecord, "pid"> {
  readonly name: SupervisedName;
  /** null: not started by `up` (an attached stack), or not running under the supervisor now. */
  readonly pid: number | null;
  /**
   * The gRPC health check's answer (`SERVING`, `NOT_SERVING`, …), or `DOWN` when it did not answer;
   * `STANDBY` for a core of a pair (`up --standby-core`) whose process runs but does not listen
   * while the other core holds the lease; `TAKING_OVER` for one that holds the lease but does not
   * listen yet (replaying the op log).
   */
  readonly health: string;
  /** Why the health check did not answer. */
  readonly error?: string;
}

/** What `ioasidctl status` found: every process of the stack and whether it is up. */
export interface StackStatus {
  /**
   * NATS accepts a connection, every service answers SERVING, and the supervisor (if any) runs; of a
   * core pair, one SERVING and the other SERVING or STANDBY.
   */
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
  /** Of a core pair, the PID of the core that answers the lease (the one serving or taking over). */
  let leaseHolder: number | undefined;
  try {
    const nc = await connect({ servers: natsServers(state.natsUrl), name: "ioasidctl-status", timeout: 1000, reconnect: false, ...addresses.natsAuth });
    if (state.standbyCore !== undefined) {
      // The core's lease (`<prefix>.core.lease`, see ioasid-core's core-lease.ts): who holds it.
      leaseHolder = await nc
        .request(`${DEFAULT_PREFIX}.core.lease`, "", { timeout: 1000 })
        .then((m) => (JSON.parse(m.string()) as { pid?: number }).pid)
        .catch(() => undefined);
    }
    await nc.close();
  } catch (err) {
    natsError = (err as Error).message;
  }
  const tls = addresses.tls;
  const pair = state.standbyCore !== undefined;
  const records: [SupervisedName, ServiceRecord][] = [
    ...(Object.entries(state.services) as [SupervisedName, ServiceRecord][]),
    ...(state.standbyCore === undefined ? [] : [[STANDBY_CORE.name, state.standbyCore] as [SupervisedName, ServiceRecord]]),
  ];
  const isCore = (name: SupervisedName) => name === "ioasid-core" || name === STANDBY_CORE.name;
  const services = await Promise.all(
    records.map(async ([name, record]): Promise<ServiceStatus> => {
      try {
        const health = await checkHealth(record.address, "", { deadlineMs: 1000, ...(tls === undefined ? {} : { client: { tls } }) });
        return { name, ...record, pid: record.pid ?? null, health };
      } catch (err) {
        // A core of a pair that runs but does not listen: it waits behind the other's lease when
        // the other holds it; holding it itself, it is taking over (replaying the op log).
        if (pair && isCore(name) && alive(record.pid) && leaseHolder !== undefined) {
          return { name, ...record, pid: record.pid ?? null, health: leaseHolder === record.pid ? "TAKING_OVER" : "STANDBY" };
        }
        return { name, ...record, pid: record.pid ?? null, health: "DOWN", error: (err as Error).message };
      }
    }),
  );
  const cores = services.filter((s) => isCore(s.name));
  const coresOk = !pair || (cores.some((s) => s.health === "SERVING") && cores.every((s) => s.health === "SERVING" || s.health === "STANDBY"));
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
    nats.up &&
    (nats.cluster?.every((n) => n.running) ?? true) &&
    coresOk &&
    services.every((s) => s.health === "SERVING" || (pair && isCore(s.name))) &&
    (supervisor === null || supervisor.running);
  return { ok, nats, supervisor, services };
}

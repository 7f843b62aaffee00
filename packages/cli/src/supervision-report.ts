import { describeExit } from "./restart-policy.js";
import { alive, Supervision, type ServiceRecord, type StackState } from "./stack-state.js";

/**
 * What the supervisor did about a service, for `ioasidctl status`: its restarts, how its last
 * process ended and when, and, unless it runs, what the supervisor does now
 * ("restarts 1, last exit (signal SIGKILL) at 2025-01-01T10:00:00.000Z").
 */
export function describeSupervision(s: ServiceRecord): string {
  const parts = [`restarts ${s.restarts ?? 0}`];
  if (s.lastExit !== undefined) parts.push(`last exit (${describeExit(s.lastExit)}) at ${new Date(s.lastExit.at).toISOString()}`);
  if (s.supervision === Supervision.RESTARTING) parts.push("RESTARTING");
  if (s.supervision === Supervision.STOPPED) parts.push(`STOPPED${s.note === undefined ? "" : `: ${s.note}`}`);
  if (s.supervision === Supervision.GAVE_UP) parts.push(`GAVE UP${s.note === undefined ? "" : `: ${s.note}`}`);
  return parts.join(", ");
}

/** The supervisor's line of `ioasidctl status`: its PID, and whether it still runs (else nothing is restarted). */
export function describeSupervisor(supervisor: NonNullable<StackState["supervisor"]>, isAlive: (pid: number | undefined) => boolean = alive): string {
  return isAlive(supervisor.pid)
    ? `supervisor pid ${supervisor.pid}  restarts a service that fails   log ${supervisor.log}`
    : `supervisor NOT RUNNING (pid ${supervisor.pid ?? "-"}): a service that fails is not restarted; \`ioasidctl down\` still stops the rest by PID   log ${supervisor.log}`;
}

import { Code } from "@ioasid/errors";
import { afterEach, describe, expect, it } from "vitest";
import { checkHealth } from "./check-health.js";
import { createLogger } from "./create-logger.js";
import { createEchoServer } from "./echo-server.js";
import { ServingStatus, type GrpcServer } from "./grpc-server.js";
import { holdSignals, runUntilSignal } from "./run-until-signal.js";

// SIGUSR2 stands in for SIGTERM: emitting it reaches only the handlers installed here, not the
// test runner's own.
const SIGNAL: NodeJS.Signals = "SIGUSR2";

describe("runUntilSignal", () => {
  let server: GrpcServer | undefined;
  let dispose: (() => void) | undefined;

  afterEach(async () => {
    dispose?.();
    await server?.shutdown(100);
    server = undefined;
  });

  it("shuts the server down gracefully on the signal, runs beforeExit, then exits 0", async () => {
    server = createEchoServer({ logger: createLogger("echo", { level: "silent" }) });
    const address = `127.0.0.1:${await server.listen()}`;
    const steps: string[] = [];
    const exited = new Promise<number>((resolve) => {
      dispose = runUntilSignal(server as GrpcServer, {
        signals: [SIGNAL],
        graceMs: 1000,
        beforeExit: () => void steps.push("beforeExit"),
        exit: (code) => {
          steps.push(`exit ${code}`);
          resolve(code);
        },
      });
    });
    process.emit(SIGNAL, SIGNAL);
    expect(await exited).toBe(0);
    expect(steps).toEqual(["beforeExit", "exit 0"]);
    expect(server.servingStatus()).toBe(ServingStatus.NOT_SERVING);
    await expect(checkHealth(address, "", { deadlineMs: 1000 })).rejects.toMatchObject({ code: Code.UNAVAILABLE });
  });

  it("exits 1 when beforeExit fails", async () => {
    server = createEchoServer({ logger: createLogger("echo", { level: "silent" }) });
    await server.listen();
    const exited = new Promise<number>((resolve) => {
      dispose = runUntilSignal(server as GrpcServer, {
        signals: [SIGNAL],
        beforeExit: () => Promise.reject(new Error("nats close failed")),
        exit: resolve,
      });
    });
    process.emit(SIGNAL, SIGNAL);
    expect(await exited).toBe(1);
  });

  it("delivers a signal held while the service started once it is in place, and stops gracefully", async () => {
    const held = holdSignals([SIGNAL]);
    // Arrives before the handler: held, not lost (and the process not killed).
    process.emit(SIGNAL, SIGNAL);
    expect(held.received).toBe(SIGNAL);
    server = createEchoServer({ logger: createLogger("echo", { level: "silent" }) });
    await server.listen();
    const exited = new Promise<number>((resolve) => {
      dispose = runUntilSignal(server as GrpcServer, { signals: [SIGNAL], graceMs: 1000, exit: resolve });
    });
    held.release();
    expect(await exited).toBe(0);
    expect(server.servingStatus()).toBe(ServingStatus.NOT_SERVING);
    expect(process.listenerCount(SIGNAL)).toBe(1);
  });

  it("releases nothing when no signal came", () => {
    const before = process.listenerCount(SIGNAL);
    const held = holdSignals([SIGNAL]);
    expect(process.listenerCount(SIGNAL)).toBe(before + 1);
    held.release();
    expect(held.received).toBeUndefined();
    expect(process.listenerCount(SIGNAL)).toBe(before);
  });
});

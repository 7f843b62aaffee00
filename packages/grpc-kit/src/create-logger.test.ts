import { describe, expect, it } from "vitest";
import { createLogger } from "./create-logger.js";

function capture(env: NodeJS.ProcessEnv): { lines: Record<string, unknown>[]; logger: ReturnType<typeof createLogger> } {
  const lines: Record<string, unknown>[] = [];
  const logger = createLogger("vdcm", { env, destination: { write: (s: string) => void lines.push(JSON.parse(s)) } });
  return { lines, logger };
}

describe("createLogger", () => {
  it("writes JSON lines carrying the service name and a textual level", () => {
    const { lines, logger } = capture({});
    logger.info({ ioasid: 201 }, "drained");
    expect(lines).toEqual([expect.objectContaining({ service: "vdcm", level: "info", msg: "drained", ioasid: 201, pid: process.pid })]);
  });

  it("takes its level from LOG_LEVEL", () => {
    const { lines, logger } = capture({ LOG_LEVEL: "warn" });
    logger.info("hidden");
    logger.warn("shown");
    expect(lines.map((l) => l["msg"])).toEqual(["shown"]);
  });

  it("falls back to info and says so when LOG_LEVEL is unknown", () => {
    const { lines, logger } = capture({ LOG_LEVEL: "chatty" });
    logger.debug("hidden");
    expect(lines).toEqual([expect.objectContaining({ level: "warn", LOG_LEVEL: "chatty" })]);
    expect(logger.level).toBe("info");
  });
});

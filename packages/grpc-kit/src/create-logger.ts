import { pino, type DestinationStream, type Logger } from "pino";
import { traceLogFields } from "./trace-log-fields.js";

/** Log levels a service accepts in `LOG_LEVEL`, most to least severe (`silent` turns logging off). */
export const LogLevel = {
  fatal: "fatal",
  error: "error",
  warn: "warn",
  info: "info",
  debug: "debug",
  trace: "trace",
  silent: "silent",
} as const;
export type LogLevel = (typeof LogLevel)[keyof typeof LogLevel];

/** Guard: is `value` one of the {@link LogLevel} names? */
export function isLogLevel(value: string): value is LogLevel {
  return Object.hasOwn(LogLevel, value);
}

/** Options of {@link createLogger}. */
export interface CreateLoggerOptions {
  /** Level; overrides `LOG_LEVEL`. @default env.LOG_LEVEL ?? "info" */
  readonly level?: LogLevel;
  /** Environment to read `LOG_LEVEL` from. @default process.env */
  readonly env?: NodeJS.ProcessEnv;
  /** Where the JSON lines go. @default stdout (synchronous, so nothing is lost on process.exit) */
  readonly destination?: DestinationStream;
}

/**
 * Creates the JSON logger of a service: one line per record on stdout, every line carrying
 * `"service": <service>` and a textual `"level"`. The level comes from `LOG_LEVEL` (an unknown value
 * falls back to `info`, with a warning line). The testkit finds a service's address in its
 * `{"msg":"listening","address":…}` line.
 *
 * @example
 * const logger = createLogger("ioasid-core");
 * logger.info({ address }, "listening");
 */
export function createLogger(service: string, options: CreateLoggerOptions = {}): Logger {
  const fromEnv = (options.env ?? process.env)["LOG_LEVEL"]?.trim().toLowerCase();
  const bad = options.level === undefined && fromEnv !== undefined && fromEnv !== "" && !isLogLevel(fromEnv);
  const level: LogLevel = options.level ?? (fromEnv !== undefined && isLogLevel(fromEnv) ? fromEnv : "info");
  const logger = pino(
    {
      level,
      base: { service, pid: process.pid },
      formatters: { level: (label) => ({ level: label }) },
      // trace_id and span_id of the active span, when there is one (DESIGN §13).
      mixin: traceLogFields,
    },
    options.destination ?? pino.destination({ dest: 1, sync: true }),
  );
  if (bad) logger.warn({ LOG_LEVEL: fromEnv, expected: Object.keys(LogLevel) }, "unknown LOG_LEVEL, using info");
  return logger;
}

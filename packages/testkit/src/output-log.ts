import { createInterface } from "node:readline";
import type { Readable } from "node:stream";

/**
 * The output of a child process, line by line (stdout and stderr interleaved in arrival order),
 * bounded to the last `maxLines` lines.
 */
export class OutputLog {
  readonly #lines: string[] = [];
  readonly #maxLines: number;
  readonly #listeners = new Set<(line: string, stream: "stdout" | "stderr") => void>();

  constructor(maxLines = 10_000) {
    this.#maxLines = maxLines;
  }

  /** Starts collecting the lines of `stream`. */
  follow(stream: Readable, name: "stdout" | "stderr"): void {
    const rl = createInterface({ input: stream, crlfDelay: Infinity });
    rl.on("line", (line) => {
      this.#lines.push(name === "stderr" ? `[stderr] ${line}` : line);
      if (this.#lines.length > this.#maxLines) this.#lines.splice(0, this.#lines.length - this.#maxLines);
      for (const listener of this.#listeners) listener(line, name);
    });
  }

  /** Calls `listener` for every later line; returns a function that stops it. */
  onLine(listener: (line: string, stream: "stdout" | "stderr") => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  /** Everything collected, one line per line. */
  text(): string {
    return this.#lines.join("\n");
  }

  /** The last `n` lines, indented, for error messages. */
  tail(n = 30): string {
    const lines = this.#lines.slice(-n);
    return lines.length === 0 ? "  (no output)" : lines.map((l) => `  ${l}`).join("\n");
  }
}

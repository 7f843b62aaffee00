#!/usr/bin/env node
import { parseArgs } from "node:util";
import { superviseStack } from "./supervisor.js";

// The embedded stack's supervisor (DESIGN §13), started detached by `ioasidctl up` with its output
// in <dir>/logs/supervisor.log: `node supervisor-main.js --dir <dir>`.
const { values } = parseArgs({ options: { dir: { type: "string" } } });
if (values.dir === undefined) {
  process.stderr.write("usage: supervisor-main.js --dir <stack directory>   (started by `ioasidctl up`)\n");
  process.exit(2);
}
await superviseStack(values.dir).catch((err: unknown) => {
  process.stdout.write(`${new Date().toISOString()} the supervisor failed: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  process.exit(1);
});

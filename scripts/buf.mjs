#!/usr/bin/env node
// Runs buf (from its platform package, or PATH) with the given arguments: `node scripts/buf.mjs lint`.
import { spawnSync } from "node:child_process";
import { bufPath } from "./buf-path.mjs";

const r = spawnSync(bufPath(), process.argv.slice(2), { stdio: "inherit" });
if (r.error) {
  console.error(`buf could not be run (${r.error.message}): on Linux x64/arm64 it comes with npm ci; elsewhere install buf on PATH`);
  process.exit(2);
}
process.exit(r.status ?? 1);

#!/usr/bin/env node
// Regenerates packages/proto from proto/ with buf + ts-proto, plus a binary FileDescriptorSet used
// by gRPC server reflection. With --check, generates into a temporary copy and fails when the
// committed files differ (connect-es style "generated code is committed and checked").
import { execFileSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync, cpSync, statSync, existsSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { bufPath } from "./buf-path.mjs";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const check = process.argv.includes("--check");
const bin = join(root, "node_modules", ".bin");
const env = { ...process.env, PATH: `${bin}:${process.env.PATH ?? ""}` };

function run(cmd, args, cwd) {
  execFileSync(cmd, args, { cwd, env, stdio: ["ignore", "inherit", "inherit"] });
}

function listFiles(dir) {
  if (!existsSync(dir)) return [];
  const out = [];
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) out.push(...listFiles(p));
    else out.push(p);
  }
  return out.sort();
}

/** Writes src/gen/** and descriptors.binpb under `outRoot` (a copy of the repo's generation inputs). */
function generate(workDir) {
  const genDir = join(workDir, "packages/proto/src/gen");
  rmSync(genDir, { recursive: true, force: true });
  mkdirSync(genDir, { recursive: true });
  run(bufPath(), ["generate"], workDir);
  run(bufPath(), ["build", "--as-file-descriptor-set", "-o", "packages/proto/descriptors.binpb"], workDir);
}

if (!check) {
  generate(root);
  console.log("generated packages/proto/src/gen and packages/proto/descriptors.binpb");
  process.exit(0);
}

const tmp = mkdtempSync(join(tmpdir(), "ioasid-gen-"));
try {
  for (const f of ["buf.yaml", "buf.gen.yaml"]) cpSync(join(root, f), join(tmp, f));
  cpSync(join(root, "proto"), join(tmp, "proto"), { recursive: true });
  mkdirSync(join(tmp, "packages/proto"), { recursive: true });
  generate(tmp);
  const want = new Map();
  for (const f of [...listFiles(join(tmp, "packages/proto/src/gen")), join(tmp, "packages/proto/descriptors.binpb")]) {
    want.set(relative(tmp, f), readFileSync(f));
  }
  const have = new Map();
  for (const f of [...listFiles(join(root, "packages/proto/src/gen")), join(root, "packages/proto/descriptors.binpb")]) {
    if (existsSync(f)) have.set(relative(root, f), readFileSync(f));
  }
  const diffs = [];
  for (const [k, v] of want)
    if (!have.has(k)) diffs.push(`missing: ${k}`);
    else if (!have.get(k).equals(v)) diffs.push(`differs: ${k}`);
  for (const k of have.keys()) if (!want.has(k)) diffs.push(`stale: ${k}`);
  if (diffs.length > 0) {
    console.error("generated code is out of date with proto/ (run `npm run gen` and commit):");
    for (const d of diffs) console.error(`  ${d}`);
    process.exit(1);
  }
  console.log(`gen:check: ${want.size} generated files match proto/`);
} finally {
  rmSync(tmp, { recursive: true, force: true });
}

import { spawnSync } from "node:child_process";
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterEach, describe, expect, it } from "vitest";

// The check `npm run lint` (and so CI) runs: `buf breaking` of proto/ against the committed
// baseline image (contracts/README.md). Run here on temporary copies of the contracts, so that a
// break introduced on purpose is seen refused, not only the clean tree accepted.

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const baseline = join(root, "contracts", "baseline.binpb");
const copies: string[] = [];

afterEach(() => {
  for (const dir of copies.splice(0)) rmSync(dir, { recursive: true, force: true });
});

/** A copy of the module (buf.yaml and proto/) to break. */
function copyContracts(): string {
  const dir = mkdtempSync(join(tmpdir(), "ioasid-breaking-"));
  copies.push(dir);
  cpSync(join(root, "buf.yaml"), join(dir, "buf.yaml"));
  cpSync(join(root, "proto"), join(dir, "proto"), { recursive: true });
  return dir;
}

/** Runs the CI's breaking check in `dir`. */
function breaking(dir: string): { status: number | null; output: string } {
  const r = spawnSync(process.execPath, [join(root, "scripts", "buf.mjs"), "breaking", "--against", baseline], { cwd: dir, encoding: "utf8" });
  return { status: r.status, output: `${r.stdout}${r.stderr}` };
}

/** Replaces one exact piece of a contract file (it must be there). */
function edit(dir: string, file: string, from: string, to: string): void {
  const path = join(dir, "proto", file);
  const text = readFileSync(path, "utf8");
  expect(text).toContain(from);
  writeFileSync(path, text.replace(from, to));
}

describe("buf breaking against the committed baseline", () => {
  it("accepts the contracts as they are", () => {
    const r = breaking(copyContracts());
    expect(r.output).toBe("");
    expect(r.status).toBe(0);
  });

  it("accepts an added message and an added field", () => {
    const dir = copyContracts();
    edit(
      dir,
      "ioasid/vfio/v1/vfio.proto",
      "message WatchFaultsResponse {",
      "message AddedForTheTest {\n  uint32 n = 1;\n}\n\nmessage WatchFaultsResponse {\n  uint32 added_for_the_test = 90;",
    );
    const r = breaking(dir);
    expect(r.output).toBe("");
    expect(r.status).toBe(0);
  });

  it("refuses a renumbered field, naming it", () => {
    const dir = copyContracts();
    edit(dir, "ioasid/vfio/v1/vfio.proto", "FaultGroup group = 1;", "FaultGroup group = 91;");
    const r = breaking(dir);
    expect(r.status).not.toBe(0);
    expect(r.output).toMatch(/WatchFaultsResponse/);
  });

  it("refuses a removed RPC", () => {
    const dir = copyContracts();
    const path = join(dir, "proto", "ioasid", "core", "v1", "core.proto");
    const text = readFileSync(path, "utf8");
    const rpc = /\n\s*rpc GetStats\([^)]*\) returns \([^)]*\);/.exec(text);
    expect(rpc).not.toBeNull();
    writeFileSync(path, text.replace(rpc![0], ""));
    const r = breaking(dir);
    expect(r.status).not.toBe(0);
    expect(r.output).toMatch(/GetStats/);
  });
});

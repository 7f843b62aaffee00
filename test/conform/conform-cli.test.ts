import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { SUITES, type ConformRole } from "@ioasid/conform";
import { stackDown, stackUp } from "@ioasid/cli";
import { startNats, startService } from "@ioasid/testkit";
import { afterAll, describe, expect, it } from "vitest";
import { built, freePort, mutantCommand, ourService } from "./conform-fixture.js";

const cli = built("packages/cli/dist/main.js");
const dir = mkdtempSync(join(tmpdir(), "ioasid-conform-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Runs `ioasidctl conform …` to its end: exit code and output. */
function ioasidctl(args: string[], env: NodeJS.ProcessEnv = process.env): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolveRun, reject) => {
    const child = spawn(process.execPath, [cli, ...args], { env, stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    child.once("error", reject);
    child.once("close", (code) => resolveRun({ code, stdout, stderr }));
  });
}

describe("ioasidctl conform", () => {
  // Acceptance (issue 13): the kit passes against each of our services, started alone on its own port.
  it.each(Object.keys(SUITES) as ConformRole[])("passes against our %s started on its own port: a line per case, a summary, JUnit XML", async (role) => {
    const junit = join(dir, `${role}.xml`);
    const target = `127.0.0.1:${await freePort()}`;
    const run = await ioasidctl(["conform", "--role", role, "--target", target, "--target-cmd", ourService(role), "--junit", junit]);
    expect(run.stderr).toBe("");
    expect(run.code).toBe(0);
    const clauses = SUITES[role]!.clauses;
    for (const c of clauses) expect(run.stdout).toContain(`PASS  ${c.id}  ${c.statement}`);
    expect(run.stdout).toContain(`${role} at ${target}: ${clauses.length} passed, 0 failed, 0 skipped of ${clauses.length} clauses in`);
    const xml = readFileSync(junit, "utf8");
    expect(xml.match(/<testcase /g)).toHaveLength(clauses.length);
    expect(xml).toContain(`tests="${clauses.length}" failures="0" errors="0" skipped="0"`);
  });

  it("verifies a KVM someone else started, pointed at a NATS and a core: the kit uses them, and skips the restart clauses", async () => {
    const nats = await startNats();
    const core = await startService({
      name: "ioasid-core",
      entry: built("services/ioasid-core/dist/main.js"),
      env: { IOASID_CORE_GRPC_ADDRESS: "127.0.0.1:0", NATS_URL: nats.url },
    });
    const kvm = await startService({
      name: "kvm",
      entry: built("services/kvm/dist/main.js"),
      env: { KVM_GRPC_ADDRESS: "127.0.0.1:0", NATS_URL: nats.url, IOASID_CORE_ADDRESS: core.address },
    });
    try {
      const run = await ioasidctl(["conform", "--role", "kvm", "--target", kvm.address, "--nats", nats.url, "--core", core.address]);
      expect(run.code).toBe(0);
      expect(run.stdout).toContain(`core         ${core.address} (already serving)`);
      expect(run.stdout).toContain("SKIP  kvm.restart.restores-and-catches-up");
      expect(run.stdout).toContain("skipped: needs --target-cmd: the kit restarts only a target it started itself");
      expect(run.stdout).toMatch(/kvm at .*: 19 passed, 0 failed, 2 skipped of 21 clauses/);
    } finally {
      await kvm.stop();
      await core.stop();
      await nats.stop();
    }
  });

  it("verifies a role inside a stack started by `ioasidctl up` (--stack): NATS and the core from its stack.json", async () => {
    const stackDir = join(dir, "stack");
    const natsPort = await freePort();
    // `up` takes five consecutive ports from --base-port: try a few random bases until one is free.
    let state: Awaited<ReturnType<typeof stackUp>> | undefined;
    for (let attempt = 0; state === undefined && attempt < 5; attempt++) {
      const basePort = 20_000 + Math.floor(Math.random() * 30_000);
      // --insecure: in a stack with mTLS the core authorizes by role, and the kit plays several (below).
      state = await stackUp({ dir: stackDir, basePort, natsPort, freshStore: true, insecure: true }).catch((err: Error) => {
        if (!err.message.includes("is in use")) throw err;
        return undefined;
      });
    }
    expect(state).toBeDefined();
    try {
      const run = await ioasidctl([
        "conform",
        "--role",
        "kvm",
        "--target",
        state!.services.kvm.address,
        "--stack",
        stackDir,
        "--only",
        "kvm.rpc,kvm.free,kvm.restart",
      ]);
      expect(run.code).toBe(0);
      expect(run.stdout).toContain(`core         ${state!.services["ioasid-core"].address} (already serving)`);
      expect(run.stdout).toMatch(/kvm at .*: 11 passed, 0 failed, 2 skipped of 13 clauses/);
    } finally {
      await stackDown({ dir: stackDir });
    }
  });

  it("refuses (exit 2, saying why and what to do) a --stack whose services speak mTLS", async () => {
    const stackDir = join(dir, "secured");
    mkdirSync(join(stackDir, "credentials", "operator.operator"), { recursive: true });
    writeFileSync(join(stackDir, "credentials", "operator.operator", "cert.pem"), "");
    writeFileSync(join(stackDir, "stack.json"), JSON.stringify({ operatorCredentials: join(stackDir, "credentials", "operator.operator") }));
    const run = await ioasidctl(["conform", "--role", "kvm", "--target", "127.0.0.1:1", "--stack", stackDir]);
    expect(run.code).toBe(2);
    expect(run.stderr).toContain("has mTLS");
    expect(run.stderr).toContain("ioasidctl up --insecure");
  });

  it("exits 1 with the clause id, expected and got when a clause fails", async () => {
    const junit = join(dir, "broken.xml");
    const target = `127.0.0.1:${await freePort()}`;
    const run = await ioasidctl([
      "conform",
      "--role",
      "kvm",
      "--target",
      target,
      "--target-cmd",
      mutantCommand("kvm", "ack-before-clear"),
      "--only",
      "kvm.free.settled-at-ack",
      "--junit",
      junit,
    ]);
    expect(run.code).toBe(1);
    expect(run.stdout).toContain("FAIL  kvm.free.settled-at-ack");
    expect(run.stdout).toMatch(/expected: \[\]\n {6}got: {6}\["13->\d+"\]/);
    expect(run.stdout).toContain("0 passed, 1 failed, 0 skipped of 1 clauses");
    expect(readFileSync(junit, "utf8")).toContain('failures="1"');
  });

  it("exits 2 on bad flags, with the usage", async () => {
    const run = await ioasidctl(["conform", "--role", "kvm", "--target", "nowhere"]);
    expect(run.code).toBe(2);
    expect(run.stderr).toContain("--target must be HOST:PORT");
    expect(run.stderr).toContain("usage:");
    expect((await ioasidctl(["conform", "--bogus"])).code).toBe(2);
  });
});

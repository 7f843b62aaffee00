import { execFile } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, describe, expect, it } from "vitest";

// One exit-code convention for ioasidctl and the services, as a script sees it (issue 17 item 3,
// clig.dev): usage errors exit 2 with the command's usage on stderr, before any state is read or
// anything is sent; --version exits 0 touching nothing; a service refuses an unknown argument and
// a duration without its unit with exit 2; `status` exits 1 when anything is down. No stack runs
// here: the --dir is empty, or holds a stack.json whose addresses nobody listens on.

const cli = fileURLToPath(new URL("../../packages/cli/dist/main.js", import.meta.url));
const serviceEntry = (s: string) => fileURLToPath(new URL(`../../services/${s}/dist/main.js`, import.meta.url));
const version = (path: string) => (JSON.parse(readFileSync(fileURLToPath(new URL(path, import.meta.url)), "utf8")) as { version: string }).version;
const dir = mkdtempSync(join(tmpdir(), "ioasidctl-exit-"));

interface Ran {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

/** Runs a node entry point to its end, whatever its exit status. */
function run(entry: string, args: readonly string[], env: NodeJS.ProcessEnv = {}): Promise<Ran> {
  return new Promise((resolve) => {
    execFile(process.execPath, [entry, ...args], { timeout: 20_000, env: { ...process.env, ...env } }, (err, stdout, stderr) => {
      resolve({ code: err === null ? 0 : typeof err.code === "number" ? err.code : -1, stdout, stderr });
    });
  });
}

afterAll(() => rmSync(dir, { recursive: true, force: true }));

// Every command with a bad command line: each would have exited 1 (or run) before, several of them
// after reading the state ("no stack is running") or with a SyntaxError from BigInt.
const usageErrors: readonly (readonly string[])[] = [
  ["up", "--base-port", "abc"],
  ["up", "--base-port", "70000"],
  ["up", "extra"],
  ["up", "--nats-cluster", "0"],
  ["up", "--nats-cluster", "9"],
  ["up", "--nats-cluster", "3", "--nats-url", "nats://127.0.0.1:4222"],
  ["down", "extra"],
  ["status", "extra"],
  ["inspect", "extra"],
  ["timeline", "--ioasid", "x"],
  ["scenario", "run", "weird"],
  ["scenario"],
  ["demo", "--base-port", "abc"],
  ["vm"],
  ["vm", "frobnicate"],
  ["vm", "create", "--name", "x"],
  ["vm", "create", "--name", "x", "--token", "abc"],
  ["vm", "create", "--token", "1"],
  ["vm", "destroy"],
  ["pasid", "alloc"],
  ["pasid", "free", "--vm", "vm1"],
  ["pasid", "steal", "--vm", "vm1"],
  ["bind", "--vm", "vm1", "--gpasid", "1"],
  ["unbind", "--vm", "vm1", "--pasid", "1", "--gpasid", "1", "--mdev", "u", "--device", "d"],
  ["mdev", "create"],
  ["mdev", "paint", "--uuid", "u"],
  ["enqcmd", "--vm", "vm1"],
  ["enqcmd", "--vm", "vm1", "--gpasid", "x"],
  ["submit", "--uuid", "u", "--pasid", "1", "--space", "elsewhere"],
  ["submit", "--pasid", "1"],
  ["attach", "--timeout-ms", "soon"],
  ["holder", "list"],
  ["dma", "--device", "idxd0", "--address", "0x1000"],
  ["faults", "list", "--vm", "vm1"],
  ["fault", "respond", "--vm", "vm1"],
  ["guest-ram", "--vm", "vm1", "--size", "0x800"],
  ["conform"],
  ["chaos", "run", "--duration", "60"],
  ["frobnicate"],
  [],
  ...["up", "down", "status", "inspect", "timeline", "vm", "pasid", "bind", "mdev", "enqcmd", "submit", "attach", "holder", "dma", "fault"].map((c) => [
    c,
    "--no-such-flag",
  ]),
];

describe("ioasidctl exit codes", () => {
  it.concurrent.each(usageErrors.map((args) => [args.join(" ") || "(no arguments)", args] as const))(
    "exits 2 with the usage on a bad command line: %s",
    async (_name, args) => {
      const r = await run(cli, [...args, "--dir", dir]);
      expect({ code: r.code, stderr: r.stderr }).toEqual({ code: 2, stderr: expect.stringMatching(/usage/) });
      // Refused before anything else: no state was read.
      expect(r.stderr).not.toMatch(/no stack is running|Cannot convert/);
    },
  );

  it("prints its version on --version and exits 0, with no stack", async () => {
    const r = await run(cli, ["--version"]);
    expect(r).toEqual({ code: 0, stdout: `ioasidctl ${version("../../packages/cli/package.json")}\n`, stderr: "" });
  });

  it("documents the exit codes in --help", async () => {
    const top = await run(cli, ["--help"]);
    expect(top.code).toBe(0);
    expect(top.stdout).toMatch(/exit codes[\s\S]*2: usage error[\s\S]*3: refused/);
    expect((await run(cli, ["enqcmd", "--help"])).stdout).toContain("3 (refused) on #GP");
  });

  it("exits 1 on an operational failure: no stack, or a VM it does not know", async () => {
    const noStack = await run(cli, ["inspect", "--dir", dir]);
    expect({ code: noStack.code, stderr: noStack.stderr }).toEqual({ code: 1, stderr: expect.stringMatching(/no stack is running/) });
    const noVm = await run(cli, ["vm", "destroy", "--name", "nobody", "--dir", dir]);
    expect({ code: noVm.code, stderr: noVm.stderr }).toEqual({ code: 1, stderr: expect.stringMatching(/no VM named nobody/) });
  });

  it("`status` exits 1 and says what is down, in text and in --json", async () => {
    // A stack.json whose NATS and services nobody listens on (port 1 on loopback refuses at once).
    const dead = join(dir, "dead");
    mkdirSync(dead);
    const services = Object.fromEntries(["ioasid-core", "iommu", "vfio", "kvm", "vdcm"].map((s) => [s, { pid: undefined, address: "127.0.0.1:1", log: "" }]));
    const state = { dir: dead, natsUrl: "nats://127.0.0.1:1", nats: { port: 1, storeDir: "", external: true }, services, startedAt: Date.now() };
    writeFileSync(join(dead, "stack.json"), JSON.stringify(state));

    const text = await run(cli, ["status", "--dir", dead]);
    expect(text.code).toBe(1);
    expect(text.stdout).toMatch(/^nats nats:\/\/127\.0\.0\.1:1 \(external\) DOWN/m);
    expect(text.stdout).toMatch(/^vdcm +pid - +127\.0\.0\.1:1 +DOWN/m);

    const json = await run(cli, ["status", "--json", "--dir", dead]);
    expect(json.code).toBe(1);
    const report = JSON.parse(json.stdout) as {
      ok: boolean;
      nats: { up: boolean };
      supervisor: unknown;
      services: { name: string; pid: unknown; health: string }[];
    };
    expect(report).toMatchObject({ ok: false, nats: { up: false }, supervisor: null });
    expect(report.services.map((s) => [s.name, s.pid, s.health])).toEqual(["ioasid-core", "iommu", "vfio", "kvm", "vdcm"].map((s) => [s, null, "DOWN"]));
  });
});

// A bare number where a duration is expected, per service: its own duration variable where it has one.
const services = [
  { name: "ioasid-core", duration: "IOASID_DELIVERY_DEADLINE" },
  { name: "iommu", duration: "IOMMU_FAULT_TIMEOUT" },
  { name: "vfio", duration: "VFIO_SESSION_GRACE" },
  { name: "kvm", duration: "IOASID_STATE_WRITE_TIMEOUT" },
  { name: "vdcm", duration: "IOASID_NATS_CONNECT_TIMEOUT" },
] as const;

describe("service exit codes", () => {
  it.each(services)("$name: --version exits 0 at once; an unknown argument and a bare-number duration exit 2", async ({ name, duration }) => {
    // NATS_URL points nowhere: a service that went on to connect would not exit 0 or 2 at once.
    const nowhere = { NATS_URL: "nats://127.0.0.1:1", IOASID_NATS_CONNECT_TIMEOUT: "30s" };
    const v = await run(serviceEntry(name), ["--version"], nowhere);
    expect(v).toEqual({ code: 0, stdout: `${name} ${version(`../../services/${name}/package.json`)}\n`, stderr: "" });

    const unknown = await run(serviceEntry(name), ["--bogus"], nowhere);
    expect(unknown.code).toBe(2);
    expect(unknown.stderr).toContain(`${name}: unknown argument "--bogus"`);
    expect(unknown.stderr).toContain(`usage: ${name} [--help | --version]`);

    const bare = await run(serviceEntry(name), [], { ...nowhere, [duration]: "5" });
    expect(bare.code).toBe(2);
    expect(bare.stderr).toContain(`${duration}="5": expected a duration with its unit: write 5ms or 5s`);
  });
});

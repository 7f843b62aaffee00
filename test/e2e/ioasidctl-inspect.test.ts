import { execFile } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, describe, expect, it } from "vitest";
import { onFreePorts, PORT_TAKEN } from "../support/free-ports.js";

// `inspect` against the embedded stack as an operator runs it (issue 17): its picture (--html,
// --mermaid) of sets → IOASIDs → holders → hardware entries, then with one role stopped — what it
// reaches is shown, what it does not is marked, and it exits 1.

const cli = fileURLToPath(new URL("../../packages/cli/dist/main.js", import.meta.url));
const dir = mkdtempSync(join(tmpdir(), "ioasidctl-inspect-"));

interface Ran {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

/** ioasidctl to its end, whatever its exit status. */
function ctl(...args: string[]): Promise<Ran> {
  return new Promise((resolve) => {
    execFile(process.execPath, [cli, ...args, "--dir", dir], { timeout: 60_000 }, (err, stdout, stderr) => {
      resolve({ code: err === null ? 0 : typeof err.code === "number" ? err.code : -1, stdout, stderr });
    });
  });
}

/** ioasidctl, which must succeed: its stdout. */
async function ok(...args: string[]): Promise<string> {
  const r = await ctl(...args);
  expect({ args, code: r.code, stderr: r.stderr }).toMatchObject({ code: 0 });
  return r.stdout;
}

/** The boxes of an `inspect --html` page's SVG: kind and text. */
const boxes = (html: string) =>
  [...html.matchAll(/<g class="node" data-kind="(\w+)" data-id="\w+" data-tone="\w+">(.*?)<\/g>/g)].map((m) => ({
    kind: m[1]!,
    text: [...m[2]!.matchAll(/<text[^>]*>(.*?)<\/text>/g)].map((t) => t[1]).join(" "),
  }));

afterAll(async () => {
  if (existsSync(join(dir, "stack.json"))) await ctl("down");
  rmSync(dir, { recursive: true, force: true });
});

describe("ioasidctl inspect", () => {
  it("draws the stack's state, and with one role stopped shows the rest and marks it UNREACHABLE (exit 1)", async () => {
    const up = await onFreePorts(
      (base) => ctl("up", "--base-port", String(base), "--nats-port", String(base + 10)),
      (r) => PORT_TAKEN.test(r.stderr),
    );
    expect({ code: up.code, stderr: up.stderr }).toMatchObject({ code: 0 });
    await ok("mdev", "create", "--device", "idxd0", "--uuid", "mdev-i", "--wqs", "0");
    expect(await ok("vm", "create", "--name", "vm1", "--token", "4343")).toMatch(/kvm vm (\d+)/);
    await ok("mdev", "assign", "--vm", "vm1", "--uuid", "mdev-i");
    const { hpasid } = JSON.parse(await ok("pasid", "alloc", "--vm", "vm1")) as { hpasid: number };
    await ok("bind", "--vm", "vm1", "--pasid", String(hpasid), "--gpasid", "101", "--mdev", "mdev-i");
    await ok("mdev", "program", "--uuid", "mdev-i", "--wq", "0", "--gpasid", "101");

    // Every service answers: the picture has the set, the IOASID, its holders, and the entry each
    // holder's reference stands for in KVM, VDCM and the IOMMU.
    const page = join(dir, "state.html");
    const all = await ctl("inspect", "--html", page);
    expect({ code: all.code, stderr: all.stderr }).toEqual({ code: 0, stderr: `wrote ${page}\n` });
    expect(all.stdout).toContain(`iommu\n  device idxd0  PF  group 1`);
    const html = readFileSync(page, "utf8");
    expect(html).not.toMatch(/<script|\bsrc=|\bhref=/);
    const drawn = boxes(html);
    expect(drawn.filter((b) => b.kind === "set").map((b) => b.text)).toEqual([
      expect.stringMatching(/^set \d+ token 4343 · quota 64 · in use 1 VFIO container \d+ \(vm1\)$/),
    ]);
    expect(drawn.filter((b) => b.kind === "ioasid").map((b) => b.text)).toEqual([`IOASID ${hpasid} · gen 1 ACTIVE · spid 101 · refs 4`]);
    expect(drawn.filter((b) => b.kind === "holder").map((b) => b.text)).toEqual(
      expect.arrayContaining([
        expect.stringMatching(/^iommu\/\S+ bind$/),
        expect.stringMatching(/^kvm\/vm-\d+ vmcs$/),
        expect.stringMatching(/^vdcm\/\S+ idxd0\.wq0$/),
      ]),
    );
    expect(drawn.filter((b) => b.kind === "entry").map((b) => b.text)).toEqual([
      expect.stringMatching(new RegExp(`^KVM VMCS · vm \\d+ \\(vm1\\) gpasid 101 → hpasid ${hpasid}$`)),
      expect.stringMatching(new RegExp(`^VDCM idxd0 wq 0 hpasid ${hpasid} · gpasid 101 · PROGRAMMED$`)),
      expect.stringMatching(new RegExp(`^IOMMU idxd0 PASID ${hpasid} NESTED domain \\d+ · handle \\d+ · gpasid 101$`)),
    ]);
    // Each entry hangs from its holder (green: accounted for).
    expect(html).toMatch(/data-from="ioasid\d+h\d+" data-to="kvm\d+g101"/);
    expect(html).not.toContain('data-tone="bad"');
    const mermaid = await ctl("inspect", "--mermaid");
    expect(mermaid.code).toBe(0);
    expect(mermaid.stdout).toMatch(/^flowchart LR\n/);
    expect(mermaid.stdout).toMatch(/ioasid\d+h\d+ --> kvm\d+g101/);

    // Stop KVM (SIGTERM: it exits 0, and the supervisor restarts nothing that stopped by hand).
    const status = JSON.parse((await ctl("status", "--json")).stdout) as { services: { name: string; pid: number }[] };
    process.kill(status.services.find((s) => s.name === "kvm")!.pid, "SIGTERM");
    const deadline = Date.now() + 20_000;
    let down: Ran;
    do down = await ctl("inspect");
    while (down.code === 0 && Date.now() < deadline);

    expect(down.code).toBe(1);
    expect(down.stdout).toMatch(/kvm VMCS PASID translation tables\n {2}kvm: UNREACHABLE \(UNAVAILABLE: .*ECONNREFUSED/);
    // The rest is still shown.
    expect(down.stdout).toMatch(new RegExp(`IOASIDs\\n\\s+${hpasid}\\s+set \\d+\\s+gen 1\\s+ACTIVE`));
    expect(down.stdout).toMatch(new RegExp(`idxd0: PASID entries ${hpasid}\\(wq0, set \\d+\\)`));
    expect(down.stdout).toMatch(new RegExp(`PASID ${hpasid} +NESTED domain`));
    expect(down.stdout).toMatch(/1 of 5 services unreachable: kvm$/m);

    const asJson = await ctl("inspect", "--json");
    expect(asJson.code).toBe(1);
    const state = JSON.parse(asJson.stdout) as Record<string, unknown>;
    expect(state).toMatchObject({
      kvm: null,
      unreachable: { kvm: expect.stringMatching(/^UNAVAILABLE: /) },
      vdcm: { devices: [{ deviceId: "idxd0", pasidEntries: [{ hpasid }] }] },
      ioasids: [{ ioasid: hpasid, state: "IOASID_STATE_ACTIVE" }],
    });
    expect(Object.keys(state.unreachable as object)).toEqual(["kvm"]);

    const partial = await ctl("inspect", "--html", page);
    expect(partial.code).toBe(1);
    const after = readFileSync(page, "utf8");
    expect(after).toMatch(/<p class="unreachable">kvm: UNREACHABLE \(UNAVAILABLE: /);
    expect(after).toMatch(/<text class="unreachable"[^>]*>kvm: UNREACHABLE/);
    expect(
      boxes(after)
        .filter((b) => b.kind === "entry")
        .map((b) => b.text.split(" ")[0]),
    ).toEqual(["VDCM", "IOMMU"]);
  }, 180_000);
});

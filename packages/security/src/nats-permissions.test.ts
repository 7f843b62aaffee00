import { describe, expect, it } from "vitest";
import { createNatsCredential, natsUserEntry, readNatsCredential, renderAuthorization, writeNatsCredential } from "./nats-credentials.js";
import { inboxPrefix, natsPermissions, STREAM_ADMIN_SUBJECTS } from "./nats-permissions.js";
import { mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

// The permission sets of DESIGN §4.6 / §11, as data; test/security/nats-permissions.test.ts shows
// nats-server enforcing them on a real stack.

describe("natsPermissions", () => {
  it("lets the core alone publish deliveries and write the op log", () => {
    const core = natsPermissions("ioasid.v1", { role: "core", instance: "core" })!;
    expect(core.publish.allow).toContain("ioasid.v1.deliver.>");
    expect(core.publish.allow).toContain("ioasid.v1.core.ops");
    expect(core.publish.allow).toContain("ioasid.v1.core.snapshot.*");
    for (const role of ["iommu", "kvm", "vdcm", "vfio"] as const) {
      const p = natsPermissions("ioasid.v1", { role, instance: "x0" })!;
      expect(p.publish.allow.some((s) => s.includes(".deliver.") || s.endsWith(".core.ops") || s.includes(".core.snapshot"))).toBe(false);
      expect(p.publish.deny).toContain("ioasid.v1.deliver.>");
      expect(p.publish.deny).toContain("ioasid.v1.core.ops");
      expect(p.publish.deny).toContain("ioasid.v1.core.snapshot.>");
    }
  });

  it("gives a role its own delivery subject in its own queue group, its own state and history, and its own inbox", () => {
    const p = natsPermissions("ioasid.v1", { role: "vdcm", instance: "vdcm0" })!;
    expect(p.subscribe.allow).toEqual(["ioasid.v1.deliver.vdcm.vdcm0 vdcm.vdcm0", "_INBOX.vdcm.vdcm0.>"]);
    expect(p.publish.allow).toContain("ioasid.v1.rolestate.vdcm.vdcm0.>");
    expect(p.publish.allow).toContain("ioasid.v1.history.vdcm.vdcm0");
    expect(p.allowResponses).toBe(true);
    expect(inboxPrefix({ role: "vdcm", instance: "vdcm0" })).toBe("_INBOX.vdcm.vdcm0");
  });

  it("gives KVM every per-VM token of its own role (ioasid.rst: a notifier per VM instance), nothing of another role", () => {
    const p = natsPermissions("ioasid.v1", { role: "kvm", instance: "kvm0" })!;
    expect(p.subscribe.allow[0]).toBe("ioasid.v1.deliver.kvm.* kvm.*");
    expect(p.publish.allow).toContain("ioasid.v1.history.kvm.*");
  });

  it("encodes instance names into one token, so a name cannot widen a permission", () => {
    const p = natsPermissions("ioasid.v1", { role: "iommu", instance: "a.>" })!;
    expect(p.subscribe.allow[0]).toBe("ioasid.v1.deliver.iommu.a~2e~3e iommu.a~2e~3e");
  });

  it("denies stream administration to every role, the core included; the operator has no limits", () => {
    for (const role of ["core", "iommu", "kvm", "vdcm", "vfio"] as const) {
      const p = natsPermissions("ioasid.v1", { role, instance: "i" })!;
      for (const s of STREAM_ADMIN_SUBJECTS) expect(p.publish.deny).toContain(s);
    }
    expect(natsPermissions("ioasid.v1", { role: "operator", instance: "op" })).toBeUndefined();
  });
});

describe("NATS credentials", () => {
  it("writes a credential readable by its owner only and reads it back", () => {
    const dir = mkdtempSync(join(tmpdir(), "ioasid-cred-"));
    try {
      const c = createNatsCredential({ role: "iommu", instance: "dmar0" });
      writeNatsCredential(join(dir, "iommu.dmar0"), c);
      expect(statSync(join(dir, "iommu.dmar0", "nats.json")).mode & 0o777).toBe(0o600);
      expect(readNatsCredential(join(dir, "iommu.dmar0"))).toEqual(c);
      writeFileSync(join(dir, "nats.json"), JSON.stringify({ role: "iommu", instance: "dmar0", seed: "SUnotaseed" }));
      expect(() => readNatsCredential(dir)).toThrow(/not a NATS user nkey seed/);
      expect(() => createNatsCredential({ role: "root" as "core", instance: "x" })).toThrow(/unknown role/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("renders an authorization block that names public keys only", () => {
    const c = createNatsCredential({ role: "core", instance: "core" });
    const text = renderAuthorization([natsUserEntry("ioasid.v1", c)]);
    expect(text).toContain(c.publicKey);
    expect(text).not.toContain(c.seed);
    expect(text).toMatch(/^authorization \{/);
  });
});

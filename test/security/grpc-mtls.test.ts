import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { credentials } from "@grpc/grpc-js";
import { readHistory } from "@ioasid/bus";
import { Code } from "@ioasid/errors";
import { auditMetadata, checkHealth, createClient, CREDENTIALS_DIR_ENV, type CreateClientOptions, type PromiseClient } from "@ioasid/grpc-kit";
import { core, events } from "@ioasid/proto";
import {
  createStackCa,
  issueCertificate,
  readInstanceCredentials,
  writeInstanceCredentials,
  type InstanceCredentials,
  type RoleIdentity,
} from "@ioasid/security";
import { startNats, startService, waitFor, type NatsServer, type ServiceProcess } from "@ioasid/testkit";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { spawnSync } from "node:child_process";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { expectRefused, serviceEntry, startCore } from "../support/core-fixture.js";

// Issue 14 item 2 against the real core process: mTLS with a stack-local CA, and the core's
// authorization by the caller's role (DESIGN §3, §11). Each refused call is checked to change
// nothing, from a snapshot of the core's state (its query RPCs) before and after.

type CoreClient = PromiseClient<typeof core.CoreServiceService>;

const MM_TOKEN = 0x7001n;
// KVM registers for a VM whose set does not exist: pending, so no delivery (nor its counters)
// changes the core's state while the snapshots are compared.
const PENDING_MM_TOKEN = 0x7fffn;
const IDENTITIES = {
  core: { role: "core", instance: "core" },
  vfio: { role: "vfio", instance: "vfio0" },
  kvm: { role: "kvm", instance: "kvm0" },
  iommu: { role: "iommu", instance: "dmar0" },
  iommu7: { role: "iommu", instance: "dmar7" },
  operator: { role: "operator", instance: "alice" },
} as const satisfies Record<string, RoleIdentity>;
type Who = keyof typeof IDENTITIES;

let root: string;
let nats: NatsServer;
let proc: ServiceProcess;
let nc: NatsConnection;
const creds = {} as Record<Who, InstanceCredentials>;
let foreignKvm: InstanceCredentials;
const clients: CoreClient[] = [];

function client(options: CreateClientOptions): CoreClient {
  const c = createClient(core.CoreServiceService, proc.address, { deadlineMs: 5000, ...options });
  clients.push(c);
  return c;
}
const as = (who: Who): CoreClient => client({ tls: creds[who], serverRole: "core" });

/** What the core holds, as its query RPCs show it (read with the VFIO credential). */
async function snapshot(): Promise<unknown> {
  const c = as("vfio");
  const [sets, ioasids, registrations, stats] = await Promise.all([c.listSets({}), c.listIoasids({ setId: 0 }), c.listRegistrations({}), c.getStats({})]);
  return { sets, ioasids, registrations, stats };
}

/** Asserts `call` is refused with `code`/`reason` and that the core's state is what it was. */
async function refusedUnchanged(call: () => Promise<unknown>, code: number, reason: string): Promise<void> {
  const before = await snapshot();
  await expectRefused(call(), code, reason);
  expect(await snapshot()).toEqual(before);
}

/** Asserts `call` fails at the transport (no handshake, no handler) and that nothing changed. */
async function unreachableUnchanged(call: () => Promise<unknown>): Promise<void> {
  const before = await snapshot();
  await expect(call()).rejects.toMatchObject({ code: Code.UNAVAILABLE });
  expect(await snapshot()).toEqual(before);
}

beforeAll(async () => {
  root = mkdtempSync(join(tmpdir(), "ioasid-mtls-"));
  const [ca, otherCa] = await Promise.all([createStackCa(), createStackCa({ commonName: "another stack" })]);
  for (const [who, id] of Object.entries(IDENTITIES) as Array<[Who, RoleIdentity]>) {
    const dir = join(root, `${id.role}-${id.instance}`);
    writeInstanceCredentials(dir, ca.certPem, await issueCertificate(ca, id));
    creds[who] = readInstanceCredentials(dir);
  }
  // A certificate naming the same KVM identity, from a CA this stack never trusted.
  const foreignDir = join(root, "foreign-kvm");
  writeInstanceCredentials(foreignDir, otherCa.certPem, await issueCertificate(otherCa, IDENTITIES.kvm));
  foreignKvm = readInstanceCredentials(foreignDir);

  nats = await startNats();
  proc = await startService({
    name: "ioasid-core",
    entry: serviceEntry("ioasid-core"),
    env: { IOASID_CORE_GRPC_ADDRESS: "127.0.0.1:0", NATS_URL: nats.url, [CREDENTIALS_DIR_ENV]: creds.core.dir },
  });
  nc = await connect({ servers: nats.url });
});

afterAll(async () => {
  for (const c of clients.splice(0)) c.close();
  await nc?.close();
  await proc?.stop();
  await nats?.stop();
  if (root !== undefined) rmSync(root, { recursive: true, force: true });
});

describe("gRPC between services: mTLS and the core's authorization by role", () => {
  // (g) first: the legitimate path builds the state every attack below tries to change.
  let setId = 0;
  let ioasid = 0;
  let generation = 0;
  let iommuRegistration = 0;

  it("records the operator's RegisterAllocator and UnregisterAllocator as allocator_change audit records naming the authenticated operator", async () => {
    // First, on a core with no IOASID outstanding (a custom allocator may only take over then).
    const since = Date.now() - 1000;
    const note = auditMetadata({ reason: "vcmd for the DSA tests", onBehalfOf: "ticket-7" });
    await as("operator").registerAllocator({ name: "vcmd", address: "127.0.0.1:1" }, { metadata: note });
    await as("operator").unregisterAllocator({ name: "vcmd" });
    // A refused change leaves no record (the audit goes with the operation, and there is none).
    await expectRefused(as("operator").unregisterAllocator({ name: "nobody" }), Code.NOT_FOUND, "ALLOCATOR_NOT_FOUND");
    let records: Awaited<ReturnType<typeof readHistory>> = [];
    await waitFor(
      async () => {
        records = (await readHistory(nc, { sinceMs: since })).filter((rec) => rec.action.$case === "allocatorChange");
        return records.length >= 2;
      },
      { timeoutMs: 20_000, message: "two allocator_change history records" },
    );
    expect(records.map((r) => ({ role: r.role, instance: r.instance, value: r.action.value }))).toEqual([
      {
        role: "ioasid",
        instance: "core",
        value: { operator: "operator/alice", registered: true, name: "vcmd", address: "127.0.0.1:1", reason: "vcmd for the DSA tests", onBehalfOf: "ticket-7" },
      },
      { role: "ioasid", instance: "core", value: { operator: "operator/alice", registered: false, name: "vcmd", address: "", reason: "", onBehalfOf: "" } },
    ]);
  });

  it("(g) serves the legitimate path: VFIO creates a set and allocates, KVM and the IOMMU take their own references and register", async () => {
    expect(proc.logs()).toContain('"tls":"mtls"');
    const set = await as("vfio").createSet({ tokenType: events.TokenType.TOKEN_TYPE_MM, token: MM_TOKEN, quota: 8 });
    setId = set.set!.setId;
    ({ ioasid, generation } = await as("vfio").alloc(core.AllocRequest.fromPartial({ setId })));
    expect(ioasid).toBeGreaterThan(0);
    await as("kvm").get({ setId, ioasid, generation, holder: { role: "kvm", instance: "vm-1", purpose: "vmcs" } });
    const r = await as("iommu").get({ setId, ioasid, generation, holder: { role: "iommu", instance: "dmar0", purpose: "bind" } });
    expect(r.refcount).toBe(3);
    await as("kvm").register(
      core.RegisterRequest.fromPartial({
        subscriber: { name: "kvm", instance: "vm-1" },
        priority: events.Priority.PRIORITY_CPU,
        scope: { $case: "mmToken", value: PENDING_MM_TOKEN },
      }),
    );
    const reg = await as("iommu").register(
      core.RegisterRequest.fromPartial({
        subscriber: { name: "iommu", instance: "dmar0" },
        priority: events.Priority.PRIORITY_IOMMU,
        scope: { $case: "global", value: true },
        events: [events.EventType.EVENT_TYPE_FREE],
      }),
    );
    iommuRegistration = reg.registration!.registrationId;
    // A read-only query is open to any authenticated role.
    expect((await as("kvm").describe({ ioasid })).info?.refcount).toBe(3);
  });

  it("(a) refuses a client without a certificate: plaintext, or TLS without a client certificate", async () => {
    await unreachableUnchanged(() => client({}).put({ setId, ioasid, generation, holder: { role: "iommu", instance: "dmar0", purpose: "bind" } }));
    const noCert = credentials.createSsl(creds.core.ca, null, null, { checkServerIdentity: () => undefined });
    await unreachableUnchanged(() =>
      client({ credentials: noCert, channelOptions: { "grpc.ssl_target_name_override": "localhost" } }).put({
        setId,
        ioasid,
        generation,
        holder: { role: "iommu", instance: "dmar0", purpose: "bind" },
      }),
    );
  });

  it("(b) refuses a client whose certificate is another CA's, even naming a real role", async () => {
    await unreachableUnchanged(() =>
      client({ tls: foreignKvm, serverRole: "core" }).put({ setId, ioasid, generation, holder: { role: "kvm", instance: "vm-1", purpose: "vmcs" } }),
    );
  });

  it("(c) refuses KVM's Put and Get as the IOMMU's holder, and the core's state is unchanged", async () => {
    const iommuHolder = { role: "iommu", instance: "dmar0", purpose: "bind" };
    await refusedUnchanged(() => as("kvm").put({ setId, ioasid, generation, holder: iommuHolder }), Code.PERMISSION_DENIED, "CALLER_NOT_HOLDER");
    await refusedUnchanged(() => as("kvm").get({ setId, ioasid, generation, holder: iommuHolder }), Code.PERMISSION_DENIED, "CALLER_NOT_HOLDER");
    // Nor as another IOMMU instance, with the IOMMU's own credential.
    await refusedUnchanged(
      () => as("iommu").put({ setId, ioasid, generation, holder: { role: "iommu", instance: "dmar1", purpose: "bind" } }),
      Code.PERMISSION_DENIED,
      "CALLER_NOT_HOLDER",
    );
  });

  it("(d) refuses registering (or unregistering) as another role's subscriber", async () => {
    await refusedUnchanged(
      () =>
        as("kvm").register(
          core.RegisterRequest.fromPartial({
            subscriber: { name: "iommu", instance: "evil" },
            priority: events.Priority.PRIORITY_IOMMU,
            scope: { $case: "global", value: true },
          }),
        ),
      Code.PERMISSION_DENIED,
      "CALLER_NOT_SUBSCRIBER",
    );
    await refusedUnchanged(() => as("kvm").unregister({ registrationId: iommuRegistration }), Code.PERMISSION_DENIED, "CALLER_NOT_SUBSCRIBER");
  });

  it("(e) refuses CreateSet with the KVM credential, allows VFIO's", async () => {
    await refusedUnchanged(
      () => as("kvm").createSet({ tokenType: events.TokenType.TOKEN_TYPE_MM, token: MM_TOKEN + 1n, quota: 0 }),
      Code.PERMISSION_DENIED,
      "ROLE_NOT_ALLOWED",
    );
    await refusedUnchanged(() => as("kvm").adjustSet({ setId, quota: 0 }), Code.PERMISSION_DENIED, "ROLE_NOT_ALLOWED");
    const made = await as("vfio").createSet({ tokenType: events.TokenType.TOKEN_TYPE_MM, token: MM_TOKEN + 1n, quota: 4 });
    expect(made.set?.quota).toBe(4);
  });

  it("(f) refuses RegisterAllocator by a non-operator; the operator's is served", async () => {
    const request = { name: "dead", address: "127.0.0.1:1" };
    for (const who of ["vfio", "kvm", "iommu"] as const) {
      await refusedUnchanged(() => as(who).registerAllocator(request), Code.PERMISSION_DENIED, "ROLE_NOT_ALLOWED");
    }
    // The operator's call reaches the core, which refuses it on its own rules (IOASIDs are outstanding).
    await expectRefused(as("operator").registerAllocator(request), Code.FAILED_PRECONDITION, "ALLOCATOR_BUSY");
  });

  it("lets the operator force-release another holder's reference, with a force_release audit record in the history", async () => {
    const since = Date.now() - 1000;
    const r = await as("operator").put(
      { setId, ioasid, generation, holder: { role: "kvm", instance: "vm-1", purpose: "vmcs" } },
      { metadata: auditMetadata({ reason: "vm-1 is gone", onBehalfOf: "bob" }) },
    );
    expect(r.refcount).toBe(2);
    let audit: Awaited<ReturnType<typeof readHistory>> = [];
    await waitFor(
      async () => {
        audit = (await readHistory(nc, { sinceMs: since })).filter((rec) => rec.action.$case === "forceRelease");
        return audit.length > 0;
      },
      { timeoutMs: 5000, message: "a force_release history record" },
    );
    expect(audit).toHaveLength(1);
    expect(audit[0]).toMatchObject({ role: "ioasid", ioasid, setId });
    // The identity is the certificate's; the reason and whom it is for are what the client said.
    expect(audit[0]!.action.value).toEqual({
      holder: "kvm/vm-1/vmcs",
      operator: "operator/alice",
      reason: "vm-1 is gone",
      onBehalfOf: "bob",
      references: [{ ioasid, generation, setId, purpose: "vmcs", count: 1 }],
    });
    // A role's own Put leaves no audit record; a client cannot make one up with the metadata either.
    await as("kvm").get({ setId, ioasid, generation, holder: { role: "kvm", instance: "vm-1", purpose: "vmcs" } });
    await as("kvm").put(
      { setId, ioasid, generation, holder: { role: "kvm", instance: "vm-1", purpose: "vmcs" } },
      { metadata: auditMetadata({ reason: "forged", onBehalfOf: "mallory" }) },
    );
    // Once KVM's own put is in the history (the operator's and KVM's: two puts of kvm/vm-1), the
    // force_release records are still the one.
    let history: Awaited<ReturnType<typeof readHistory>> = [];
    await waitFor(
      async () => {
        history = await readHistory(nc, { sinceMs: since });
        return history.filter((rec) => rec.action.$case === "ioasidPut" && rec.action.value.holder?.instance === "vm-1").length >= 2;
      },
      { timeoutMs: 20_000, message: "KVM's own put in the history" },
    );
    expect(history.filter((rec) => rec.action.$case === "forceRelease")).toHaveLength(1);
  });
});

describe("a role started with its credentials", () => {
  it("reaches the core over mTLS (reconcile and registration authorized as itself) and serves only mTLS clients", async () => {
    const iommu = await startService({
      name: "iommu",
      entry: serviceEntry("iommu"),
      env: {
        IOMMU_GRPC_ADDRESS: "127.0.0.1:0",
        IOMMU_INSTANCE: "dmar7",
        IOASID_CORE_ADDRESS: proc.address,
        NATS_URL: nats.url,
        [CREDENTIALS_DIR_ENV]: creds.iommu7.dir,
      },
    });
    try {
      // It listens only once it has reconciled with the core and registered (runRole's order).
      const regs = await as("vfio").listRegistrations({});
      expect(regs.registrations.map((r) => `${r.subscriber?.name}/${r.subscriber?.instance}`)).toContain("iommu/dmar7");
      expect(await checkHealth(iommu.address, "", { client: { tls: creds.vfio, serverRole: "iommu" } })).toBe("SERVING");
      await expect(checkHealth(iommu.address)).rejects.toMatchObject({ code: Code.UNAVAILABLE });
      // A client that expects the IOMMU refuses a server that is not one.
      await expect(checkHealth(proc.address, "", { client: { tls: creds.vfio, serverRole: "iommu" } })).rejects.toMatchObject({ code: Code.UNAVAILABLE });
    } finally {
      expect(await iommu.stop()).toBe(0);
    }
  });

  it("refuses to start with another role's credentials (exit 2, before listening)", () => {
    const r = spawnSync(process.execPath, [serviceEntry("iommu")], {
      env: { ...process.env, IOMMU_GRPC_ADDRESS: "127.0.0.1:0", NATS_URL: nats.url, IOASID_CORE_ADDRESS: proc.address, [CREDENTIALS_DIR_ENV]: creds.kvm.dir },
      encoding: "utf8",
      timeout: 15_000,
    });
    expect(r.status).toBe(2);
    expect(r.stderr).toContain("credentials of kvm/kvm0, not of role iommu");
    expect(r.stdout).not.toContain('"msg":"listening"');
  });
});

describe("an insecure core", () => {
  it("says so loudly at start (one warn line)", async () => {
    const fixture = await startCore({}, { nats });
    try {
      const warns = fixture.proc
        .logs()
        .split("\n")
        .filter((l) => l.includes('"level":"warn"') && l.includes("INSECURE"));
      expect(warns).toHaveLength(1);
    } finally {
      await fixture.stop();
    }
  });
});

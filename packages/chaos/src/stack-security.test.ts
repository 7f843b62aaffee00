import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createEchoServer, createLogger, type GrpcServer } from "@ioasid/grpc-kit";
import {
  createStackCa,
  issueCertificate,
  readInstanceCredentials,
  writeInstanceCredentials,
  type InstanceCredentials,
  type RoleIdentity,
} from "@ioasid/security";
import { startNats, type NatsServer } from "@ioasid/testkit";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { assertNatsRefusesAnonymous, assertServicesSecure } from "./stack-security.js";

// The chaos stack's check at start (a run on a stack that is insecure by accident must fail
// loudly), against real gRPC servers and a real nats-server on loopback.
describe("assertServicesSecure", () => {
  const silent = createLogger("echo", { level: "silent" });
  let root: string;
  let operator: InstanceCredentials;
  let kvm: InstanceCredentials;
  let server: GrpcServer | undefined;

  beforeAll(async () => {
    root = mkdtempSync(join(tmpdir(), "ioasid-chaos-sec-"));
    const ca = await createStackCa();
    const write = async (id: RoleIdentity) => {
      const dir = join(root, `${id.role}.${id.instance}`);
      writeInstanceCredentials(dir, ca.certPem, await issueCertificate(ca, id));
      return readInstanceCredentials(dir);
    };
    operator = await write({ role: "operator", instance: "operator" });
    kvm = await write({ role: "kvm", instance: "kvm0" });
  });
  afterAll(() => rmSync(root, { recursive: true, force: true }));
  afterEach(async () => {
    await server?.shutdown(200);
    server = undefined;
  });

  const serve = async (tls: InstanceCredentials | undefined): Promise<string> => {
    server = createEchoServer({ logger: silent, ...(tls === undefined ? {} : { tls }) });
    return `127.0.0.1:${await server.listen()}`;
  };

  it("passes a service that demands a client certificate and proves its role", async () => {
    const address = await serve(kvm);
    await expect(assertServicesSecure([{ name: "kvm", address, role: "kvm" }], operator, { timeoutMs: 5000 })).resolves.toBeUndefined();
  });

  it("calls a service that answers a plaintext client INSECURE (a NATS-only credentials directory serves plaintext)", async () => {
    const address = await serve(undefined);
    await expect(assertServicesSecure([{ name: "kvm", address, role: "kvm" }], operator, { timeoutMs: 5000 })).rejects.toThrow(
      /^INSECURE: kvm at 127\.0\.0\.1:\d+ answered/,
    );
  });

  it("refuses a service whose certificate names another role, through any address", async () => {
    const address = await serve(kvm);
    await expect(assertServicesSecure([{ name: "iommu", address, role: "iommu" }], operator, { timeoutMs: 5000 })).rejects.toThrow(
      /iommu at 127\.0\.0\.1:\d+: the operator's certificate \(the server proving it is iommu\) was refused/,
    );
  });
});

describe("assertNatsRefusesAnonymous", () => {
  let nats: NatsServer | undefined;
  afterEach(async () => {
    await nats?.stop();
    nats = undefined;
  });

  it("passes a nats-server that refuses clients without a credential", async () => {
    // env: {} keeps a NATS_URL of the developer's shell from replacing the server under test.
    nats = await startNats({ env: {}, jetstream: false, auth: { anonymous: "refuse" } });
    await expect(assertNatsRefusesAnonymous(nats.url)).resolves.toBeUndefined();
  });

  it("calls one that lets an anonymous client in INSECURE: without authorization, or with an unlimited no_auth_user", async () => {
    nats = await startNats({ env: {}, jetstream: false, auth: false });
    await expect(assertNatsRefusesAnonymous(nats.url)).rejects.toThrow(
      /^INSECURE: nats-server at nats:\/\/127\.0\.0\.1:\d+ let a client without a credential in/,
    );
    await nats.stop();
    nats = await startNats({ env: {}, jetstream: false });
    await expect(assertNatsRefusesAnonymous(nats.url)).rejects.toThrow(/^INSECURE/);
  });
});

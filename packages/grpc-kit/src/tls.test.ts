import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { credentials, ServerInterceptingCall, type ServerInterceptor } from "@grpc/grpc-js";
import { Code } from "@ioasid/errors";
import { testing } from "@ioasid/proto";
import {
  createStackCa,
  issueCertificate,
  readInstanceCredentials,
  writeInstanceCredentials,
  type InstanceCredentials,
  type RoleIdentity,
} from "@ioasid/security";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { createClient, type PromiseClient } from "./create-client.js";
import { createLogger } from "./create-logger.js";
import { createEchoServer } from "./echo-server.js";
import type { GrpcServer } from "./grpc-server.js";
import { callerIdentity, connectionOf, CREDENTIALS_DIR_ENV, loadCredentials } from "./tls.js";

const silent = createLogger("echo", { level: "silent" });
const payload = Buffer.from("hi");

describe("mTLS between services", () => {
  let root: string;
  let core: InstanceCredentials;
  let kvm: InstanceCredentials;
  let foreign: InstanceCredentials;
  let coreDir: string;
  let server: GrpcServer | undefined;
  const clients: Array<PromiseClient<typeof testing.EchoServiceService>> = [];
  const seen: Array<RoleIdentity | undefined> = [];
  // The caller's identity as a server-side interceptor reads it, for every call that gets through.
  const recordCaller: ServerInterceptor = (_method, call) => {
    seen.push(callerIdentity(call));
    return new ServerInterceptingCall(call);
  };

  beforeAll(async () => {
    root = mkdtempSync(join(tmpdir(), "ioasid-tls-"));
    const [ca, otherCa] = await Promise.all([createStackCa(), createStackCa({ commonName: "another stack" })]);
    const write = async (name: string, id: RoleIdentity, by = ca) => {
      const dir = join(root, name);
      writeInstanceCredentials(dir, by.certPem, await issueCertificate(by, id));
      return dir;
    };
    coreDir = await write("core", { role: "core", instance: "core" });
    core = readInstanceCredentials(coreDir);
    kvm = readInstanceCredentials(await write("kvm", { role: "kvm", instance: "kvm0" }));
    foreign = readInstanceCredentials(await write("foreign", { role: "kvm", instance: "kvm0" }, otherCa));
  });
  afterAll(() => rmSync(root, { recursive: true, force: true }));
  afterEach(async () => {
    for (const c of clients.splice(0)) c.close();
    seen.length = 0;
    await server?.shutdown(200);
    server = undefined;
  });

  const serve = async (tls: InstanceCredentials | undefined): Promise<string> => {
    server = createEchoServer({ logger: silent, interceptors: [recordCaller], ...(tls === undefined ? {} : { tls }) });
    await server.listen();
    return server.address!;
  };
  const client = (address: string, options: Parameters<typeof createClient>[2] = {}) => {
    const c = createClient(testing.EchoServiceService, address, { deadlineMs: 3000, ...options });
    clients.push(c);
    return c;
  };

  it("serves a client with a certificate of the stack CA, and the server reads who it is", async () => {
    const address = await serve(core);
    expect(server!.secure).toBe(true);
    const res = await client(address, { tls: kvm, serverRole: "core" }).echo({ payload });
    expect(Buffer.from(res.payload).toString()).toBe("hi");
    expect(seen).toEqual([{ role: "kvm", instance: "kvm0" }]);
  });

  // Behind wrapping interceptors too: the core's authorization comes after two (the call observer
  // and the role refusal), and each hands the next its own ServerInterceptingCall.
  it.each([0, 2])(
    "reads each connection's caller once, and keeps connections apart: two clients with different certificates, several calls each (behind %i wrapping interceptors)",
    async (wraps) => {
      const connections: object[] = [];
      const wrap: ServerInterceptor = (_method, call) => new ServerInterceptingCall(call);
      const recordConnection: ServerInterceptor = (_method, call) => {
        const c = connectionOf(call);
        if (c !== undefined) connections.push(c);
        return new ServerInterceptingCall(call);
      };
      const interceptors = [...Array.from({ length: wraps }, () => wrap), recordConnection, recordCaller];
      server = createEchoServer({ logger: silent, interceptors, tls: core });
      await server.listen();
      const fromKvm = client(server.address!, { tls: kvm, serverRole: "core" });
      const fromCore = client(server.address!, { tls: core, serverRole: "core" });
      for (let i = 0; i < 3; i++) {
        await fromKvm.echo({ payload });
        await fromCore.echo({ payload });
      }
      // grpc-js exposes the connection to an interceptor (else every call would read the certificate).
      expect(connections).toHaveLength(6);
      expect(new Set(connections).size).toBe(2);
      const kvm0 = { role: "kvm", instance: "kvm0" };
      const core0 = { role: "core", instance: "core" };
      expect(seen).toEqual([kvm0, core0, kvm0, core0, kvm0, core0]);
    },
  );

  it("refuses a plaintext client, a client without a certificate and a client of another CA before any handler", async () => {
    const address = await serve(core);
    const withoutCert = credentials.createSsl(core.ca, null, null, { checkServerIdentity: () => undefined });
    for (const options of [{}, { credentials: withoutCert, channelOptions: { "grpc.ssl_target_name_override": "localhost" } }, { tls: foreign }]) {
      await expect(client(address, options).echo({ payload })).rejects.toMatchObject({ code: Code.UNAVAILABLE });
    }
    expect(seen).toEqual([]);
  });

  it("refuses a server that is not the role the client dials", async () => {
    const address = await serve(core);
    await expect(client(address, { tls: kvm, serverRole: "vfio" }).echo({ payload })).rejects.toMatchObject({ code: Code.UNAVAILABLE });
  });

  it("knows no caller on a plaintext server (insecure mode)", async () => {
    const address = await serve(undefined);
    expect(server!.secure).toBe(false);
    await client(address).echo({ payload });
    expect(seen).toEqual([undefined]);
  });

  it("reads the credentials directory the environment names, and only that", () => {
    expect(loadCredentials({})).toBeUndefined();
    expect(loadCredentials({ [CREDENTIALS_DIR_ENV]: "" })).toBeUndefined();
    expect(loadCredentials({ [CREDENTIALS_DIR_ENV]: coreDir }, { role: "core" })?.identity).toEqual({ role: "core", instance: "core" });
    expect(() => loadCredentials({ [CREDENTIALS_DIR_ENV]: coreDir }, { role: "kvm" })).toThrow(/credentials of core\/core, not of role kvm/);
    expect(() => loadCredentials({ [CREDENTIALS_DIR_ENV]: join(root, "nowhere") })).toThrow(/cannot read ca\.pem/);
    // A directory with the NATS user only (no certificate): gRPC without TLS.
    mkdirSync(join(root, "nats-only"));
    writeFileSync(join(root, "nats-only", "nats.json"), "{}");
    expect(loadCredentials({ [CREDENTIALS_DIR_ENV]: join(root, "nats-only") })).toBeUndefined();
  });
});

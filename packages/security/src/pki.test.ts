import { X509Certificate } from "node:crypto";
import { mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  chainProblem,
  createStackCa,
  issueCertificate,
  readInstanceCredentials,
  readStackCa,
  writeInstanceCredentials,
  writeStackCa,
  type StackCa,
} from "./pki.js";

describe("stack PKI", () => {
  let ca: StackCa;
  let other: StackCa;
  let root: string;
  beforeAll(async () => {
    [ca, other] = await Promise.all([createStackCa(), createStackCa({ commonName: "another stack" })]);
    root = mkdtempSync(join(tmpdir(), "ioasid-pki-"));
  });
  afterAll(() => rmSync(root, { recursive: true, force: true }));

  it("makes a CA that may sign only end-entity certificates", () => {
    const cert = new X509Certificate(ca.certPem);
    expect(cert.ca).toBe(true);
    expect(cert.checkIssued(cert)).toBe(true);
    expect(cert.verify(cert.publicKey)).toBe(true);
    expect(cert.publicKey.asymmetricKeyType).toBe("ec");
  });

  it("issues a certificate that chains to the CA and names the identity (URI, CN, localhost, 127.0.0.1)", async () => {
    const issued = await issueCertificate(ca, { role: "kvm", instance: "kvm0" }, { hosts: ["kvm", "10.0.0.7"] });
    const leaf = new X509Certificate(issued.certPem);
    const caCert = new X509Certificate(ca.certPem);
    expect(leaf.checkIssued(caCert)).toBe(true);
    expect(leaf.verify(caCert.publicKey)).toBe(true);
    expect(chainProblem(leaf, caCert)).toBeUndefined();
    expect(leaf.ca).toBe(false);
    expect(leaf.subject).toBe("CN=kvm/kvm0");
    expect(leaf.subjectAltName).toBe("URI:spiffe://ioasid-fabric/kvm/kvm0, DNS:localhost, IP Address:127.0.0.1, DNS:kvm, IP Address:10.0.0.7");
    // serverAuth + clientAuth: the same certificate serves and dials.
    expect(leaf.keyUsage).toEqual(expect.arrayContaining(["1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"]));
    expect(leaf.checkHost("localhost")).toBe("localhost");
    expect(leaf.checkIP("127.0.0.1")).toBe("127.0.0.1");
  });

  it("tells a certificate of another CA apart", async () => {
    const foreign = new X509Certificate((await issueCertificate(other, { role: "core", instance: "core" })).certPem);
    const caCert = new X509Certificate(ca.certPem);
    expect(foreign.verify(caCert.publicKey)).toBe(false);
    expect(chainProblem(foreign, caCert)).toMatch(/not signed by the CA/);
  });

  it("refuses an expired certificate", async () => {
    const old = await issueCertificate(ca, { role: "vdcm", instance: "vdcm0" }, { now: new Date(Date.UTC(2000, 0, 1)), validityDays: 1 });
    expect(chainProblem(new X509Certificate(old.certPem), new X509Certificate(ca.certPem))).toMatch(/expired/);
  });

  it("writes an instance directory (key 0600) and reads the identity back", async () => {
    const dir = join(root, "iommu-dmar0");
    writeInstanceCredentials(dir, ca.certPem, await issueCertificate(ca, { role: "iommu", instance: "dmar0" }));
    expect(statSync(join(dir, "key.pem")).mode & 0o777).toBe(0o600);
    expect(statSync(dir).mode & 0o777).toBe(0o700);
    const creds = readInstanceCredentials(dir);
    expect(creds.identity).toEqual({ role: "iommu", instance: "dmar0" });
    expect(creds.key.toString()).toMatch(/^-----BEGIN PRIVATE KEY-----/);
  });

  it("keeps the CA key beside the instance directories, 0600, and reads it back", () => {
    const caDir = writeStackCa(root, ca);
    expect(statSync(join(caDir, "ca.key")).mode & 0o777).toBe(0o600);
    expect(readStackCa(root)).toEqual(ca);
  });

  it("refuses a directory whose certificate is another CA's, or whose key is not the certificate's", async () => {
    const foreign = join(root, "foreign");
    writeInstanceCredentials(foreign, ca.certPem, await issueCertificate(other, { role: "vfio", instance: "vfio0" }));
    expect(() => readInstanceCredentials(foreign)).toThrow(/cert\.pem: not signed by the CA/);
    const mixed = join(root, "mixed");
    writeInstanceCredentials(mixed, ca.certPem, await issueCertificate(ca, { role: "vfio", instance: "vfio0" }));
    writeFileSync(join(mixed, "key.pem"), (await issueCertificate(ca, { role: "vfio", instance: "vfio1" })).keyPem);
    expect(() => readInstanceCredentials(mixed)).toThrow(/key\.pem is not the key of cert\.pem/);
    expect(() => readInstanceCredentials(join(root, "missing"))).toThrow(/cannot read ca\.pem \(ENOENT\)/);
  });
});

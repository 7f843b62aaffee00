import { describe, expect, it } from "vitest";
import { assertRoleIdentity, formatIdentity, fromIdentityUri, identityFromSubjectAltName, ROLES, toIdentityUri } from "./identity.js";

describe("RoleIdentity", () => {
  it("round-trips every role through its SPIFFE-style URI", () => {
    for (const role of ROLES) {
      const id = { role, instance: "a-1.b:c@d_e" };
      const uri = toIdentityUri(id);
      expect(uri.startsWith(`spiffe://ioasid-fabric/${role}/`)).toBe(true);
      expect(fromIdentityUri(uri)).toEqual(id);
    }
  });

  it("percent-encodes the instance so that ':' and '@' cannot be read as URI syntax", () => {
    expect(toIdentityUri({ role: "kvm", instance: "host:1@x" })).toBe("spiffe://ioasid-fabric/kvm/host%3A1%40x");
  });

  it("names the caller as role/instance", () => {
    expect(formatIdentity({ role: "iommu", instance: "dmar0" })).toBe("iommu/dmar0");
  });

  it("refuses unknown roles, bad instances, other trust domains and extra path segments", () => {
    expect(() => assertRoleIdentity({ role: "root", instance: "x" })).toThrow(/unknown role/);
    expect(() => assertRoleIdentity({ role: "kvm", instance: "" })).toThrow(/instance/);
    expect(() => assertRoleIdentity({ role: "kvm", instance: "a/b" })).toThrow(/instance/);
    expect(() => assertRoleIdentity({ role: "kvm", instance: "x".repeat(129) })).toThrow(/instance/);
    expect(fromIdentityUri("spiffe://other/kvm/kvm0")).toBeUndefined();
    expect(fromIdentityUri("spiffe://ioasid-fabric/kvm/kvm0/extra")).toBeUndefined();
    expect(fromIdentityUri("spiffe://ioasid-fabric/kvm/a%2Fb")).toBeUndefined();
    expect(fromIdentityUri("spiffe://ioasid-fabric/kvm/%E0%A4%A")).toBeUndefined();
    expect(fromIdentityUri("spiffe://ioasid-fabric/admin/x")).toBeUndefined();
  });

  it("reads the one identity of a subjectAltName as Node prints it", () => {
    const san = "URI:spiffe://ioasid-fabric/vfio/vfio0, DNS:localhost, IP Address:127.0.0.1";
    expect(identityFromSubjectAltName(san)).toEqual({ role: "vfio", instance: "vfio0" });
    expect(identityFromSubjectAltName('URI:"spiffe://ioasid-fabric/vfio/vfio0"')).toEqual({ role: "vfio", instance: "vfio0" });
  });

  it("reads no identity from a SAN with none, or with two (which would speak?)", () => {
    expect(identityFromSubjectAltName(undefined)).toBeUndefined();
    expect(identityFromSubjectAltName("DNS:localhost")).toBeUndefined();
    expect(identityFromSubjectAltName("URI:https://example.com/, DNS:localhost")).toBeUndefined();
    expect(identityFromSubjectAltName("URI:spiffe://ioasid-fabric/kvm/a, URI:spiffe://ioasid-fabric/core/core")).toBeUndefined();
    expect(identityFromSubjectAltName("URI:spiffe://ioasid-fabric/kvm/a, URI:spiffe://ioasid-fabric/bogus/b")).toBeUndefined();
  });
});

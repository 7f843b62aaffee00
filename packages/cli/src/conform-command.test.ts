import { describe, expect, it } from "vitest";
import { ConformUsageError, parseConformOptions } from "./conform-command.js";

describe("ioasidctl conform flags", () => {
  it("takes a role, a target and a way to reach what the target uses", () => {
    expect(parseConformOptions({ role: "kvm", target: "127.0.0.1:50154", "target-cmd": "node kvm.js", junit: "out.xml", only: "kvm.free, kvm.rpc" })).toEqual({
      role: "kvm",
      target: "127.0.0.1:50154",
      targetCmd: "node kvm.js",
      junitFile: "out.xml",
      only: ["kvm.free", "kvm.rpc"],
      json: false,
      list: false,
    });
    expect(parseConformOptions({ role: "kvm", target: "localhost:1", nats: "nats://127.0.0.1:4222", core: "127.0.0.1:50051" })).toMatchObject({
      natsUrl: "nats://127.0.0.1:4222",
      coreAddress: "127.0.0.1:50051",
    });
    expect(parseConformOptions({ role: "kvm", target: "[::1]:9", stack: ".ioasid" })).toMatchObject({ stackDir: ".ioasid" });
  });

  it("--list needs only the role", () => {
    expect(parseConformOptions({ role: "kvm", list: true })).toEqual({ role: "kvm", target: "-", json: false, list: true });
  });

  it.each([
    [{ target: "127.0.0.1:1", stack: "d" }, "--role is required"],
    [{ role: "qemu", target: "127.0.0.1:1", stack: "d" }, '--role must be one of kvm, vdcm, iommu, vfio, core, got "qemu"'],
    [{ role: "kvm", stack: "d" }, "--target HOST:PORT is required"],
    [{ role: "kvm", target: "127.0.0.1", stack: "d" }, "--target must be HOST:PORT"],
    [{ role: "kvm", target: "127.0.0.1:0", stack: "d" }, "a port in 1..65535"],
    [{ role: "kvm", target: "127.0.0.1:1" }, "give --target-cmd CMD"],
    [{ role: "kvm", target: "127.0.0.1:1", stack: "d", nats: "nats://x:1" }, "not both"],
    [{ role: "kvm", target: "127.0.0.1:1", nats: "http://x" }, "--nats must be a NATS URL"],
    [{ role: "kvm", target: "127.0.0.1:1", nats: "nats://x:1", core: "x" }, "--core must be HOST:PORT"],
    [{ role: "kvm", target: "127.0.0.1:1", nats: "nats://x:1" }, "--nats needs --core HOST:PORT with --role kvm"],
  ])("refuses %j: %s", (values, message) => {
    expect(() => parseConformOptions(values)).toThrow(ConformUsageError);
    expect(() => parseConformOptions(values)).toThrow(message);
  });
});

import { describe, expect, expectTypeOf, it } from "vitest";
import {
  ConfigError,
  configOrExit,
  defineConfigSchema,
  describeConfig,
  formatBytesValue,
  loadConfig,
  parseAddress,
  parseBytes,
  type HostPort,
} from "./load-config.js";

const schema = defineConfigSchema({
  address: { name: "IOASID_CORE_GRPC_ADDRESS", kind: "address", default: "127.0.0.1:50051", doc: "Where the core listens." },
  port: { name: "IOASID_CORE_PORT", kind: "port", default: 0, doc: "Metrics port." },
  capacityBits: { name: "IOASID_CAPACITY_BITS", kind: "int", min: 1, max: 20, default: 20, doc: "PASID width." },
  natsUrl: { name: "NATS_URL", kind: "url", protocols: ["nats:", "tls:"], default: "nats://127.0.0.1:4222", doc: "NATS server." },
  logLevel: { name: "LOG_LEVEL", kind: "enum", values: ["debug", "info", "warn"], default: "info", doc: "Log level." },
  ackDeadline: { name: "IOASID_ACK_DEADLINE", kind: "duration-ms", default: 2000, doc: "Delivery deadline." },
  persist: { name: "IOASID_PERSIST", kind: "boolean", default: true, doc: "Keep state in JetStream." },
  instance: { name: "IOASID_INSTANCE", kind: "string", doc: "Instance name." },
  zone: { name: "IOASID_ZONE", kind: "string", optional: true, doc: "Zone label." },
});

describe("loadConfig", () => {
  it("applies defaults and returns typed values", () => {
    const config = loadConfig(schema, { IOASID_INSTANCE: "core-0" });
    expect(config).toEqual({
      address: { host: "127.0.0.1", port: 50051, address: "127.0.0.1:50051" },
      port: 0,
      capacityBits: 20,
      natsUrl: "nats://127.0.0.1:4222",
      logLevel: "info",
      ackDeadline: 2000,
      persist: true,
      instance: "core-0",
      zone: undefined,
    });
    expectTypeOf(config.address).toEqualTypeOf<HostPort>();
    expectTypeOf(config.logLevel).toEqualTypeOf<"debug" | "info" | "warn">();
    expectTypeOf(config.ackDeadline).toEqualTypeOf<number>();
    expectTypeOf(config.zone).toEqualTypeOf<string | undefined>();
    expectTypeOf(config.instance).toEqualTypeOf<string>();
  });

  it("parses every kind from the environment", () => {
    const config = loadConfig(schema, {
      IOASID_CORE_GRPC_ADDRESS: "[::1]:0",
      IOASID_CORE_PORT: "9090",
      IOASID_CAPACITY_BITS: "16",
      NATS_URL: "tls://nats.example:4443",
      LOG_LEVEL: "debug",
      IOASID_ACK_DEADLINE: "1.5s",
      IOASID_PERSIST: "off",
      IOASID_INSTANCE: "core-1",
      IOASID_ZONE: "rack-3",
    });
    expect(config.address).toEqual({ host: "::1", port: 0, address: "[::1]:0" });
    expect(config).toMatchObject({ port: 9090, capacityBits: 16, logLevel: "debug", ackDeadline: 1500, persist: false, zone: "rack-3" });
  });

  it("treats an empty variable as unset", () => {
    expect(loadConfig(schema, { IOASID_INSTANCE: "x", IOASID_CORE_PORT: "  " }).port).toBe(0);
  });

  it("collects every bad variable into one ConfigError, each with what was expected", () => {
    const err = (() => {
      try {
        loadConfig(schema, {
          IOASID_CORE_GRPC_ADDRESS: "localhost",
          IOASID_CORE_PORT: "abc",
          IOASID_CAPACITY_BITS: "21",
          NATS_URL: "http://x",
          LOG_LEVEL: "loud",
          IOASID_ACK_DEADLINE: "soon",
          IOASID_PERSIST: "maybe",
        });
      } catch (e) {
        return e;
      }
      return undefined;
    })();
    expect(err).toBeInstanceOf(ConfigError);
    const configError = err as ConfigError;
    expect(configError.problems.map((p) => p.name)).toEqual([
      "IOASID_CORE_GRPC_ADDRESS",
      "IOASID_CORE_PORT",
      "IOASID_CAPACITY_BITS",
      "NATS_URL",
      "LOG_LEVEL",
      "IOASID_ACK_DEADLINE",
      "IOASID_PERSIST",
      "IOASID_INSTANCE",
    ]);
    expect(configError.message).toContain('IOASID_CORE_PORT="abc": expected an integer port 0..65535');
    expect(configError.message).toContain('IOASID_CAPACITY_BITS="21": expected an integer 1..20');
    expect(configError.message).toContain('LOG_LEVEL="loud": expected one of debug, info, warn');
    expect(configError.message).toContain('NATS_URL="http://x": expected a URL with scheme nats: or tls:');
    expect(configError.message).toContain("IOASID_INSTANCE is not set: expected a value");
    expect(configError.message).toMatch(/^invalid configuration \(8 problems\)/);
  });

  it("takes a list of URLs where the variable allows one (a NATS cluster's servers), each checked", () => {
    const cluster = defineConfigSchema({
      urls: { name: "NATS_URL", kind: "url", protocols: ["nats:"], list: true, default: "nats://127.0.0.1:4222", doc: "d" },
    });
    expect(loadConfig(cluster, { NATS_URL: "nats://127.0.0.1:4222, nats://127.0.0.1:4223,nats://127.0.0.1:4224" }).urls).toBe(
      "nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224",
    );
    expect(() => loadConfig(cluster, { NATS_URL: "nats://127.0.0.1:4222,http://x" })).toThrow(
      "expected a URL with scheme nats:, or a comma-separated list of them",
    );
    // Without `list`, a comma is no separator.
    expect(() => loadConfig(schema, { IOASID_INSTANCE: "x", NATS_URL: "nats://a:1,nats://b:2" })).toThrow(ConfigError);
  });

  it("takes a list of host:port where the variable allows one (a core and its standby): the first's host and port, a gRPC target of all", () => {
    const cores = defineConfigSchema({ core: { name: "IOASID_CORE_ADDRESS", kind: "address", list: true, default: "127.0.0.1:50051", doc: "d" } });
    expect(loadConfig(cores, {}).core).toEqual({ host: "127.0.0.1", port: 50051, address: "127.0.0.1:50051" });
    expect(loadConfig(cores, { IOASID_CORE_ADDRESS: "127.0.0.1:50051, 127.0.0.1:50061" }).core).toEqual({
      host: "127.0.0.1",
      port: 50051,
      address: "ipv4:127.0.0.1:50051,127.0.0.1:50061",
    });
    expect(() => loadConfig(cores, { IOASID_CORE_ADDRESS: "127.0.0.1:50051,nowhere" })).toThrow("or a comma-separated list of IPv4 host:port");
    expect(() => loadConfig(cores, { IOASID_CORE_ADDRESS: "127.0.0.1:50051,core-b:50061" })).toThrow(ConfigError);
  });

  it("reports an invalid default as a problem of the schema", () => {
    const broken = defineConfigSchema({ p: { name: "P", kind: "port", default: 70000, doc: "d" } });
    expect(() => loadConfig(broken, {})).toThrow('P (default)="70000": expected an integer port 0..65535');
  });
});

describe("parseAddress", () => {
  it("accepts host:port and [v6]:port, refuses the rest", () => {
    expect(parseAddress("vfio:7000")).toEqual({ host: "vfio", port: 7000, address: "vfio:7000" });
    expect(parseAddress("::1:80")).toBeUndefined();
    expect(parseAddress("host:65536")).toBeUndefined();
    expect(parseAddress(":80")).toBeUndefined();
  });
});

describe("bytes variables", () => {
  const memory = defineConfigSchema({
    base: { name: "HOST_MEMORY_BASE", kind: "bytes", default: 1n << 32n, doc: "Where host memory starts." },
    guest: { name: "GUEST_MEMORY_SIZE", kind: "bytes", default: 1n << 30n, max: 1n << 40n, doc: "Memory per guest." },
  });

  it("reads decimal and hex, with binary units, as bigints that keep 64-bit addresses exact", () => {
    expect(parseBytes("4096")).toBe(4096n);
    expect(parseBytes("64G")).toBe(64n << 30n);
    expect(parseBytes("64GiB")).toBe(64n << 30n);
    expect(parseBytes("512m")).toBe(512n << 20n);
    expect(parseBytes("4 K")).toBe(4096n);
    expect(parseBytes("1T")).toBe(1n << 40n);
    expect(parseBytes("0x1_0000_0000")).toBe(1n << 32n);
    expect(parseBytes("0xffff_ffff_ffff_f000")).toBe(0xffff_ffff_ffff_f000n);
    expect(parseBytes("16b")).toBe(16n);
    for (const bad of ["", "-1", "1.5G", "0x", "G", "12Q", "0x1_0000_0000_0000_0000", "16E"]) expect(parseBytes(bad), bad).toBeUndefined();
    const config = loadConfig(memory, { HOST_MEMORY_BASE: "0x2_0000_0000" });
    expect(config).toEqual({ base: 0x2_0000_0000n, guest: 1n << 30n });
    expectTypeOf(config.base).toEqualTypeOf<bigint>();
  });

  it("refuses what does not parse and what is above its max, saying what it accepts", () => {
    expect(() => loadConfig(memory, { HOST_MEMORY_BASE: "lots", GUEST_MEMORY_SIZE: "2T" })).toThrow(
      /HOST_MEMORY_BASE="lots": expected bytes: a number \(or 0x hex\)[^\n]*\n\s*GUEST_MEMORY_SIZE="2T": expected bytes[^\n]*at most 1099511627776/,
    );
  });

  it("shows a default in the largest unit that divides it, as it can be written back", () => {
    expect(formatBytesValue(64n << 30n)).toBe("64G");
    expect(formatBytesValue(4096n)).toBe("4K");
    expect(formatBytesValue(4095n)).toBe("4095");
    expect(formatBytesValue(0n)).toBe("0");
    expect(describeConfig(memory)).toContain("default 4G");
    for (const n of [4096n, 64n << 30n, 4095n, 3n << 40n]) expect(parseBytes(formatBytesValue(n))).toBe(n);
  });
});

describe("describeConfig", () => {
  it("lists every variable with its doc, what it accepts and its default", () => {
    const help = describeConfig(schema);
    for (const v of Object.values(schema)) expect(help).toContain(v.name);
    expect(help).toContain("Where the core listens.");
    expect(help).toContain("default 127.0.0.1:50051");
    expect(help).toMatch(/IOASID_INSTANCE[^\n]*\n[^\n]*required/);
  });
});

describe("configOrExit", () => {
  class Exit extends Error {
    constructor(readonly code: number) {
      super(`exit ${code}`);
    }
  }
  const exit = (code: number): never => {
    throw new Exit(code);
  };

  it("prints every problem to stderr and exits 2", () => {
    let stderr = "";
    const run = () =>
      configOrExit(schema, { service: "ioasid-core", env: { IOASID_CORE_PORT: "abc" }, argv: [], exit, stderr: { write: (t: string) => (stderr += t) } });
    expect(run).toThrow(Exit);
    expect(() => run()).toThrow(expect.objectContaining({ code: 2 }));
    expect(stderr).toContain("ioasid-core: invalid configuration (2 problems)");
    expect(stderr).toContain('IOASID_CORE_PORT="abc"');
  });

  it("prints the variables on --help and exits 0", () => {
    let stdout = "";
    expect(() => configOrExit(schema, { service: "ioasid-core", env: {}, argv: ["--help"], exit, stdout: { write: (t: string) => (stdout += t) } })).toThrow(
      expect.objectContaining({ code: 0 }),
    );
    expect(stdout).toContain("NATS_URL");
  });

  it("takes durations with their unit only, 0 alone excepted, and says how to write a bare number", () => {
    const parse = (v: string) => loadConfig(schema, { IOASID_INSTANCE: "a", IOASID_ACK_DEADLINE: v }).ackDeadline;
    expect(parse("250ms")).toBe(250);
    expect(parse("5s")).toBe(5000);
    expect(parse("1.5m")).toBe(90_000);
    expect(parse("1h")).toBe(3_600_000);
    expect(parse("0")).toBe(0);
    expect(loadConfig(schema, { IOASID_INSTANCE: "a" }).ackDeadline).toBe(2000);
    for (const bare of ["5", "2000", "1.5"]) {
      expect(() => parse(bare), bare).toThrow(ConfigError);
      expect(() => parse(bare), bare).toThrow(`write ${bare}ms or ${bare}s`);
    }
    expect(() => parse("soon")).toThrow(/a duration with its unit/);
    expect(describeConfig(schema)).toMatch(/IOASID_ACK_DEADLINE[^\n]*\n[^\n]*default 2s/);
  });

  it("prints the service and its version on --version and exits 0, reading no configuration", () => {
    let stdout = "";
    // The environment is invalid: --version answers before it is read.
    const run = () =>
      configOrExit(schema, {
        service: "kvm",
        version: "1.2.3",
        env: { IOASID_CORE_PORT: "abc" },
        argv: ["--version"],
        exit,
        stdout: { write: (t: string) => (stdout += t) },
      });
    expect(run).toThrow(expect.objectContaining({ code: 0 }));
    expect(stdout).toBe("kvm 1.2.3\n");
  });

  it("refuses any other argument with exit 2 and its usage, before reading the environment", () => {
    for (const argv of [["--bogus"], ["start"], ["--versions"]]) {
      let stderr = "";
      const run = () => configOrExit(schema, { service: "kvm", env: { IOASID_INSTANCE: "a" }, argv, exit, stderr: { write: (t: string) => (stderr += t) } });
      expect(run, argv[0]).toThrow(expect.objectContaining({ code: 2 }));
      expect(stderr).toContain(`kvm: unknown argument "${argv[0]}"`);
      expect(stderr).toContain("usage: kvm [--help | --version]");
    }
  });

  it("returns the configuration when it is valid", () => {
    expect(configOrExit(schema, { service: "ioasid-core", env: { IOASID_INSTANCE: "a" }, argv: [], exit }).instance).toBe("a");
  });
});

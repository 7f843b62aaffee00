import { describe, expect, it } from "vitest";
import { noPositionals, parseCount, parseU64, parseVerb, requireString, UsageError } from "./usage-error.js";

describe("ioasidctl's flag parsers", () => {
  it("take well-formed values", () => {
    expect(parseCount("42", "n")).toBe(42);
    expect(parseCount("65535", "port", 65535)).toBe(65535);
    expect(parseU64("4242", "token")).toBe(4242n);
    expect(parseU64("0xffffffffffffffff", "token")).toBe((1n << 64n) - 1n);
    expect(requireString("vm1", "name")).toBe("vm1");
    expect(parseVerb(["create"], ["create", "list"], "vm")).toBe("create");
    expect(() => noPositionals([], "status")).not.toThrow();
  });

  it("refuse a missing or malformed value as a UsageError naming the flag, never a SyntaxError", () => {
    const cases: [() => unknown, RegExp][] = [
      [() => parseCount(undefined, "pasid"), /--pasid is required/],
      [() => parseCount("abc", "base-port", 65535), /--base-port must be an integer 0..65535, got abc/],
      [() => parseCount("70000", "base-port", 65535), /--base-port/],
      [() => parseCount("-1", "n"), /--n must be a non-negative integer/],
      [() => parseU64("abc", "token"), /--token must be an integer/],
      [() => parseU64("0x10000000000000000", "token"), /64 bits/],
      [() => requireString("", "name"), /--name is required/],
      [() => parseVerb([], ["create"], "vm"), /vm needs a verb: create/],
      [() => parseVerb(["frobnicate"], ["create", "list"], "vm"), /unknown verb "frobnicate" for vm: create, list/],
      [() => parseVerb(["create", "x"], ["create"], "vm"), /unexpected argument "x"/],
      [() => noPositionals(["x"], "status"), /status takes no arguments/],
    ];
    for (const [f, message] of cases) {
      expect(f).toThrow(UsageError);
      expect(f).toThrow(message);
    }
  });
});

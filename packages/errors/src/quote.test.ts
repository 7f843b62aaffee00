import { describe, expect, it } from "vitest";
import { boundMessage, MAX_QUOTED_CHARS, quote } from "./quote.js";

describe("quote", () => {
  it("quotes a short string whole, JSON-escaped", () => {
    expect(quote("vm-1")).toBe('"vm-1"');
    expect(quote('a"b\nc')).toBe('"a\\"b\\nc"');
  });

  it("keeps only the first MAX_QUOTED_CHARS characters of a long string and says how long it was", () => {
    const q = quote("x".repeat(50_000));
    expect(q).toBe(`"${"x".repeat(MAX_QUOTED_CHARS)}"… (50000 characters)`);
  });

  it("does not cut a surrogate pair in half", () => {
    const s = "a".repeat(MAX_QUOTED_CHARS - 1) + "😀".repeat(10);
    expect(quote(s)).toBe(`"${"a".repeat(MAX_QUOTED_CHARS - 1)}"… (${s.length} characters)`);
  });
});

describe("boundMessage", () => {
  it("leaves a message within the cap alone and cuts a longer one to the cap, saying so", () => {
    expect(boundMessage("short", 100)).toBe("short");
    const cut = boundMessage("m".repeat(5000), 100);
    expect(cut.length).toBeLessThanOrEqual(100);
    expect(cut).toContain("of 5000 characters");
  });
});

import { describe, expect, it } from "vitest";
import { decodeIa32Pasid, GpCause, Ia32Pasid, toIa32Pasid } from "./ia32-pasid.js";

describe("decodeIa32Pasid", () => {
  it("takes the guest PASID from bits 19:0 when bit 31 (valid) is set", () => {
    expect(decodeIa32Pasid(0x8000_0065)).toEqual({ ok: true, gpasid: 101 });
    expect(decodeIa32Pasid(0x800f_ffff)).toEqual({ ok: true, gpasid: 0xfffff });
  });

  it("is #GP PASID_NOT_VALID when bit 31 is clear, still reporting the PASID field", () => {
    expect(decodeIa32Pasid(0x0000_0065)).toEqual({ ok: false, gpasid: 101, cause: GpCause.PASID_NOT_VALID });
    expect(decodeIa32Pasid(0)).toEqual({ ok: false, gpasid: 0, cause: GpCause.PASID_NOT_VALID });
  });

  it("is #GP RESERVED_BITS when any of bits 30:20 is set", () => {
    for (let bit = 20; bit <= 30; bit++) {
      expect(decodeIa32Pasid((Ia32Pasid.VALID | (1 << bit) | 101) >>> 0)).toEqual({ ok: false, gpasid: 101, cause: GpCause.RESERVED_BITS });
    }
  });

  it("checks the valid bit before the reserved bits", () => {
    expect(decodeIa32Pasid(0x7ff0_0065)).toMatchObject({ ok: false, cause: GpCause.PASID_NOT_VALID });
  });

  it("round-trips with toIa32Pasid", () => {
    expect(toIa32Pasid(101)).toBe(0x8000_0065);
    expect(decodeIa32Pasid(toIa32Pasid(0xabcde))).toEqual({ ok: true, gpasid: 0xabcde });
  });
});

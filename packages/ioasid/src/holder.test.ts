import { describe, expect, it } from "vitest";
import { Code, DomainError } from "@ioasid/errors";
import { checkedHolderKey, toHolderKey, type Holder } from "./holder.js";

function refusal(fn: () => unknown): DomainError {
  try {
    fn();
  } catch (err) {
    if (err instanceof DomainError) return err;
    throw err;
  }
  throw new Error("expected a refusal");
}

describe("checkedHolderKey", () => {
  it("is toHolderKey for a valid holder, also when asked again", () => {
    const h: Holder = { role: "kvm", instance: "vm-7", purpose: "vmcs" };
    const first = checkedHolderKey(h);
    expect(first).toBe(toHolderKey(h));
    expect(checkedHolderKey({ ...h })).toBe(first);
  });

  it("refuses what assertHolder refuses, also next to holders it accepted (only accepted ones are remembered)", () => {
    checkedHolderKey({ role: "kvm", instance: "a", purpose: "b" });
    for (const bad of [
      { role: "kvm", instance: "a", purpose: "" },
      { role: "kvm", instance: "a/b", purpose: "b" },
      { role: "set-owner", instance: "a", purpose: "b" },
      { role: "kvm", instance: "a", purpose: 7 as unknown as string },
      undefined,
    ]) {
      const e = refusal(() => checkedHolderKey(bad as Holder));
      expect([e.code, e.reason]).toEqual([Code.INVALID_ARGUMENT, "HOLDER_INVALID"]);
    }
  });

  it("keeps answering correctly after its memory starts over (more holders than it keeps, 65,536)", () => {
    for (let i = 0; i < 70_000; i++) {
      const h = { role: "vdcm", instance: `vm-${i}`, purpose: `wq${i % 7}` };
      expect(checkedHolderKey(h)).toBe(`vdcm/vm-${i}/wq${i % 7}`);
    }
    expect(checkedHolderKey({ role: "vdcm", instance: "vm-3", purpose: "wq3" })).toBe("vdcm/vm-3/wq3");
    expect(() => checkedHolderKey({ role: "vdcm", instance: "vm-3", purpose: "wq 3" })).toThrow(DomainError);
  });

  it("checks the values it makes the key of: a holder whose fields change between reads is refused or keyed as first read", () => {
    let reads = 0;
    const shifty = {
      role: "kvm",
      instance: "vm-1",
      get purpose() {
        return reads++ === 0 ? "ok" : "not ok/";
      },
    };
    expect(checkedHolderKey(shifty)).toBe("kvm/vm-1/ok");
  });
});

import { describe, expect, it } from "vitest";
import { ReusedWriter } from "./reused-writer.js";

describe("ReusedWriter", () => {
  it("returns bytes of the caller's own: a later encoding does not change an earlier one's", () => {
    const w = new ReusedWriter();
    const a = w.encode((x) => x.uint32(1).uint32(2));
    const b = w.encode((x) => x.uint32(300));
    expect([...a]).toEqual([1, 2]);
    expect([...b]).toEqual([0xac, 0x02]);
  });

  it("starts over after an encoding that throws: nothing half written reaches the next", () => {
    const w = new ReusedWriter();
    expect(() =>
      w.encode((x) => {
        x.uint32(7).fork().uint32(8);
        throw new Error("bad value");
      }),
    ).toThrow("bad value");
    expect([...w.encode((x) => x.uint32(9))]).toEqual([9]);
  });

  it("gives an encoding started inside another a writer of its own", () => {
    const w = new ReusedWriter();
    let inner: Uint8Array | undefined;
    const outer = w.encode((x) => {
      x.uint32(1);
      inner = w.encode((y) => y.uint32(2));
      return x.uint32(3);
    });
    expect([...outer]).toEqual([1, 3]);
    expect([...inner!]).toEqual([2]);
  });
});

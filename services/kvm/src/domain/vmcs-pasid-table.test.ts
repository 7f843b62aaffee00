import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { VmcsPasidTable, type PasidTranslation } from "./vmcs-pasid-table.js";

const at = new Date(0);
const entry = (gpasid: number, hpasid: number, bindSeq: number, generation = 1): PasidTranslation => ({
  gpasid,
  hpasid,
  generation,
  bindSeq: BigInt(bindSeq),
  installedAt: at,
});

describe("VmcsPasidTable", () => {
  it("installs gpasid → hpasid and translates it", () => {
    const t = new VmcsPasidTable();
    expect(t.install(entry(101, 201, 1))).toEqual({ kind: "installed", replaced: [] });
    expect(t.translate(101)).toMatchObject({ hpasid: 201, generation: 1 });
    expect(t.translate(102)).toBeUndefined();
    expect(t.size).toBe(1);
  });

  it("leaves the table unchanged for the same translation again (a redelivered BIND)", () => {
    const t = new VmcsPasidTable();
    t.install(entry(101, 201, 1));
    expect(t.install(entry(101, 201, 1))).toEqual({ kind: "unchanged" });
    expect(t.size).toBe(1);
  });

  it("lets a later BIND of the guest PASID replace an earlier one, and ignores an earlier one arriving late", () => {
    const t = new VmcsPasidTable();
    t.install(entry(101, 201, 1));
    const later = t.install(entry(101, 202, 3));
    expect(later).toMatchObject({ kind: "installed", replaced: [{ gpasid: 101, hpasid: 201 }] });
    expect(t.install(entry(101, 201, 1))).toMatchObject({ kind: "superseded", current: { hpasid: 202 } });
    expect(t.translate(101)?.hpasid).toBe(202);
  });

  it("clears by host PASID and generation only, so a late UNBIND of 201 never removes 101 → 202", () => {
    const t = new VmcsPasidTable();
    t.install(entry(101, 202, 3));
    expect(t.clearHpasid(201, 1)).toBeUndefined();
    expect(t.clearHpasid(202, 2)).toBeUndefined(); // another generation: another owner
    expect(t.translate(101)?.hpasid).toBe(202);
    expect(t.clearHpasid(202, 1)).toMatchObject({ gpasid: 101 });
    expect(t.clearHpasid(202, 1)).toBeUndefined(); // idempotent
    expect(t.size).toBe(0);
  });

  it("clears everything, ascending by guest PASID", () => {
    const t = new VmcsPasidTable();
    t.install(entry(7, 300, 2));
    t.install(entry(3, 301, 1));
    expect(t.clear().map((e) => e.gpasid)).toEqual([3, 7]);
    expect(t.entries()).toEqual([]);
  });

  it("keeps guest and host PASIDs one to one whatever the order of installs and clears", () => {
    const op = fc.oneof(
      fc.record({
        kind: fc.constant("install" as const),
        g: fc.integer({ min: 1, max: 5 }),
        h: fc.integer({ min: 200, max: 205 }),
        gen: fc.integer({ min: 1, max: 2 }),
      }),
      fc.record({ kind: fc.constant("clear" as const), h: fc.integer({ min: 200, max: 205 }), gen: fc.integer({ min: 1, max: 2 }) }),
    );
    fc.assert(
      fc.property(fc.array(op, { maxLength: 60 }), (ops) => {
        const t = new VmcsPasidTable();
        let seq = 0;
        for (const o of ops) {
          if (o.kind === "install") t.install(entry(o.g, o.h, ++seq, o.gen));
          else t.clearHpasid(o.h, o.gen);
          const all = t.entries();
          expect(new Set(all.map((e) => e.hpasid)).size).toBe(all.length);
          for (const e of all) {
            expect(t.translate(e.gpasid)).toBe(e);
            expect(t.findByHpasid(e.hpasid)).toBe(e);
          }
        }
      }),
    );
  });
});

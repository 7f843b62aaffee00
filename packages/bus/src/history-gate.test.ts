import { describe, expect, it } from "vitest";
import { HistoryGate } from "./history-gate.js";
import type { HistoryActionInput } from "./history-catalogue.js";
import type { RoleStatePort, StateChange } from "./role-state.js";

/** A step named `name` (a chaos note: any case of the catalogue would do), and its name back. */
const step = (name: string): HistoryActionInput => ({ $case: "chaosNote", value: { note: name } });
const nameOf = (a: HistoryActionInput): string => (a.$case === "chaosNote" ? (a.value.note ?? "") : a.$case);

/** A store whose writes wait until the test settles them. */
function manualStore() {
  const writes: Array<{ changes: readonly StateChange[]; ok: () => void; fail: (e: Error) => void }> = [];
  const store: RoleStatePort = {
    write: (changes) => new Promise<void>((ok, fail) => writes.push({ changes, ok, fail })),
  };
  return { store, writes };
}

const tick = (ms = 40) => new Promise((r) => setTimeout(r, ms));

describe("HistoryGate", () => {
  it("holds a table change's record until the write that keeps it succeeds, and keeps the record's time", async () => {
    const out: Array<[string, number | undefined]> = [];
    const gate = new HistoryGate({ quiet: () => false, checkMs: 5 });
    const h = gate.wrap({ record: (a, _f, ts) => void out.push([nameOf(a), ts]) });
    const { store, writes } = manualStore();
    const kept = gate.store(store);
    h.record(step("entry set"), {}, 1234);
    const w = kept.write([{ key: "h/1", value: 1 }]);
    h.record(step("made_after_the_write_began"));
    await tick();
    expect(out).toEqual([]);
    writes[0]!.ok();
    await w;
    await tick(1);
    expect(out).toEqual([["entry set", 1234]]);
    expect(gate.held).toBe(1); // the later record waits for a later write
    void kept.write([]);
    writes[1]!.ok();
    await tick(1);
    expect(out.map((o) => o[0])).toEqual(["entry set", "made_after_the_write_began"]);
  });

  it("releases nothing after a failed write: the role stops, and its change was not kept", async () => {
    const out: string[] = [];
    const gate = new HistoryGate({ checkMs: 5 });
    const h = gate.wrap({ record: (a) => void out.push(nameOf(a)) });
    const { store, writes } = manualStore();
    const kept = gate.store(store);
    h.record(step("bind"));
    const w = kept.write([{ key: "bind/3", value: 1 }]);
    writes[0]!.fail(new Error("nats timeout"));
    await expect(w).rejects.toThrow("nats timeout");
    h.record(step("anything_later"));
    await tick();
    expect(out).toEqual([]);
  });

  it("releases a later write's records when it lands, while an earlier write still in flight holds back only its own", async () => {
    const out: string[] = [];
    const gate = new HistoryGate({ quiet: () => false, checkMs: 5 });
    const h = gate.wrap({ record: (a) => void out.push(nameOf(a)) });
    const { store, writes } = manualStore();
    const kept = gate.store(store);
    h.record(step("a"));
    void kept.write([{ key: "a", value: 1 }]);
    h.record(step("b"));
    const second = kept.write([{ key: "b", value: 1 }]);
    writes[1]!.ok(); // the later write lands first (another key, another subject)
    await second;
    await tick(1);
    expect(out).toEqual(["b"]);
    writes[0]!.fail(new Error("timeout")); // the earlier one fails: its record never goes out
    await tick(10);
    h.record(step("c"));
    await tick();
    expect(out).toEqual(["b"]);
  });

  it("lets a record out at once when the role is quiet and nothing is in flight, and holds it while the role has unwritten changes", async () => {
    const out: string[] = [];
    let dirty = true;
    const gate = new HistoryGate({ quiet: () => !dirty, checkMs: 5 });
    const h = gate.wrap({ record: (a) => void out.push(nameOf(a)) });
    h.record(step("translate"));
    await tick();
    expect(out).toEqual([]);
    dirty = false;
    await tick();
    expect(out).toEqual(["translate"]);
  });
});

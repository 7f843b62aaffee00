import { describe, expect, it } from "vitest";
import {
  decodePositions,
  encodePositions,
  MAX_CALL_POSITIONS,
  noteReceived,
  processPositions,
  RECEIVED_WINDOW,
  receivedCursor,
  registerPosition,
  takeReceived,
  touchPosition,
  type HistoryLink,
} from "./history-position.js";

// Order without clocks (issue 18): the positions a message carries between components, and what a
// recorder's next record names of them.

const at = (role: string, publisherSeq: number, instance = "i/1 x"): HistoryLink => ({ role, instance, incarnation: "run", publisherSeq });

describe("history positions", () => {
  it("round-trips through a header value, names with separators included, and drops what does not parse", () => {
    const links = [at("kvm", 3), at("ioasid", 9_007_199_254_740_991, "core")];
    expect(decodePositions(encodePositions(links))).toEqual(links);
    expect(decodePositions(`${encodePositions([at("kvm", 1)])} garbage a/b/c/0`)).toEqual([at("kvm", 1)]);
    expect(decodePositions(undefined)).toEqual([]);
  });

  it("gives each recorder the newest position of each publisher received since its previous record, once", () => {
    const a = receivedCursor();
    const b = receivedCursor();
    noteReceived([at("core-x", 4)]);
    noteReceived([at("core-x", 2)]); // an older one, received later: the newest still wins
    expect(takeReceived(a)).toEqual([at("core-x", 4)]);
    expect(takeReceived(a)).toEqual([]);
    expect(takeReceived(b)).toEqual([at("core-x", 4)]); // another recorder still gets it
    noteReceived([at("core-x", 5)]);
    expect(takeReceived(a)).toEqual([at("core-x", 5)]);
    // A recorder made afterwards follows only what it receives from then on.
    expect(takeReceived(receivedCursor())).toEqual([]);
  });

  it("keeps a bounded window of what was received: a recorder silent for longer names only the latest", () => {
    const silent = receivedCursor();
    for (let i = 0; i < 3 * RECEIVED_WINDOW; i++) noteReceived([at(`p${i}`, 1)]);
    const named = takeReceived(silent);
    expect(named.length).toBeGreaterThanOrEqual(RECEIVED_WINDOW);
    expect(named.length).toBeLessThanOrEqual(2 * RECEIVED_WINDOW);
    expect(named).toContainEqual(at(`p${3 * RECEIVED_WINDOW - 1}`, 1));
  });

  it("sends the positions of the recorders that numbered a record last, at most a few", () => {
    // Held here: the registry holds recorders weakly.
    const recorders = Array.from({ length: MAX_CALL_POSITIONS + 4 }, (_, i) => ({ position: () => at("vm", 1, `vm-${i}`) }));
    recorders.forEach((r, i) => registerPosition("vm", `vm-${i}`, r));
    touchPosition("vm", "vm-0");
    const sent = processPositions();
    expect(sent).toHaveLength(MAX_CALL_POSITIONS);
    expect(sent[0]).toEqual(at("vm", 1, "vm-0"));
    expect(sent.map((l) => l.instance)).not.toContain("vm-1");
    expect(recorders).toHaveLength(MAX_CALL_POSITIONS + 4); // kept alive to here
  });
});

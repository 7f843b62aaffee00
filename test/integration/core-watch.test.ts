import { afterEach, describe, expect, it } from "vitest";
import { Client, credentials, type ServiceError } from "@grpc/grpc-js";
import { Code } from "@ioasid/errors";
import { toDomainError } from "@ioasid/grpc-kit";
import { core, events } from "@ioasid/proto";
import { waitFor } from "@ioasid/testkit";
import { startCore, type CoreFixture } from "../support/core-fixture.js";

// A WatchEvents reader that stops reading cannot grow the core without bound (DESIGN §8; issue 14:
// 20 paused readers over ~360k events grew the core by 145 MB). The bound is read through GetStats.

const WATCH_BUFFER = 500;
const WATCH = "/ioasid.core.v1.CoreService/WatchEvents";
const same = (b: Buffer): Buffer => b;

let fixture: CoreFixture | undefined;
const rawClients: Client[] = [];
afterEach(async () => {
  for (const c of rawClients.splice(0)) c.close();
  await fixture?.stop();
  fixture = undefined;
});

describe("WatchEvents of a reader that does not read", () => {
  it("holds at most IOASID_CORE_WATCH_BUFFER events for it, then ends it with READER_TOO_SLOW and a resume point that carries on without a gap", async () => {
    fixture = await startCore({ IOASID_CORE_WATCH_BUFFER: String(WATCH_BUFFER) });
    const c = fixture.client;
    const raw = new Client(fixture.proc.address, credentials.createInsecure());
    rawClients.push(raw);
    const call = raw.makeServerStreamRequest(WATCH, same, same, Buffer.from(core.WatchEventsRequest.encode({ fromSeq: 0n, types: [] }).finish()));
    call.pause(); // the reader stops reading
    const received: number[] = [];
    call.on("data", (b: Buffer) => received.push(Number(core.WatchEventsResponse.decode(b).event!.seq)));
    const ended = new Promise<unknown>((resolve) => {
      call.on("error", (err: ServiceError) => resolve(toDomainError(err)));
      call.on("end", () => resolve("end"));
    });
    await waitFor(async () => (await c.getStats({})).watchers === 1, { timeoutMs: 10_000, message: "the watcher open" });

    // Thousands of events per round (4000 ALLOC, then FREE_SET's FREEs) until the core cuts the
    // reader off; after each, the core holds no more than the bound for it.
    let maxHeld = 0;
    let cut = false;
    for (let round = 0; round < 30 && !cut; round++) {
      const set = (await c.createSet({ tokenType: events.TokenType.TOKEN_TYPE_NONE, token: BigInt(1000 + round), quota: 4000 })).set!.setId;
      await c.batchAlloc({ setId: set, count: 4000, min: 0, max: 0 });
      await c.freeSet({ setId: set });
      const s = await c.getStats({});
      maxHeld = Math.max(maxHeld, s.watchBufferedMax);
      cut = s.watchers === 0;
    }
    expect(cut, "the paused reader was cut off").toBe(true);
    expect(maxHeld).toBeLessThanOrEqual(WATCH_BUFFER);

    // The reader comes back: what reached it, then RESOURCE_EXHAUSTED saying where the core stopped.
    call.resume();
    const err = await ended;
    expect(err).toMatchObject({ code: Code.RESOURCE_EXHAUSTED, reason: "READER_TOO_SLOW" });
    const resumeFrom = Number((err as { metadata: Record<string, string> }).metadata["resume_from_seq"]);
    // Events in flight at the cut may be lost with it: the reader resumes after the last it got
    // (the first event of this fresh core is seq 1).
    const from = received.length === 0 ? 1 : received[received.length - 1]! + 1;
    expect(from).toBeLessThanOrEqual(resumeFrom);
    expect(received).toEqual(Array.from({ length: received.length }, (_, i) => i + 1));

    // WatchEvents from there carries on without a gap.
    for await (const msg of c.watchEvents({ fromSeq: BigInt(from), types: [] })) {
      expect(Number(msg.event!.seq)).toBe(from);
      break;
    }
  });
});

describe("WatchEvents of some event types", () => {
  it("sends only the types asked for, from the retained log and as they commit, and refuses a value that is not an event type", async () => {
    fixture = await startCore({ IOASID_CORE_WATCH_BUFFER: "100" });
    const c = fixture.client;
    const { EventType, TokenType } = events;
    const early = (await c.createSet({ tokenType: TokenType.TOKEN_TYPE_NONE, token: 1n, quota: 500 })).set!.setId;
    await c.batchAlloc({ setId: early, count: 500, min: 0, max: 0 });
    await c.freeSet({ setId: early });
    const ac = new AbortController();
    const seen: Array<[string, number]> = [];
    const reading = (async () => {
      for await (const m of c.watchEvents(
        { fromSeq: 1n, types: [EventType.EVENT_TYPE_SET_FREE, EventType.EVENT_TYPE_SET_ALLOC] },
        { signal: ac.signal, deadlineMs: 20_000 },
      )) {
        seen.push([events.eventTypeToJSON(m.event!.type), m.event!.setId]);
        if (seen.length === 4) break;
      }
    })();
    // Thousands of events of other types after the stream opened, more than its buffer of 100:
    // they are neither sent nor held for it, so it is not cut off.
    const later = (await c.createSet({ tokenType: TokenType.TOKEN_TYPE_NONE, token: 2n, quota: 2000 })).set!.setId;
    await c.batchAlloc({ setId: later, count: 2000, min: 0, max: 0 });
    await c.freeSet({ setId: later });
    await reading;
    ac.abort();
    expect(seen).toEqual([
      ["EVENT_TYPE_SET_ALLOC", early],
      ["EVENT_TYPE_SET_FREE", early],
      ["EVENT_TYPE_SET_ALLOC", later],
      ["EVENT_TYPE_SET_FREE", later],
    ]);
    const refused = async (types: number[]) => {
      for await (const m of c.watchEvents({ fromSeq: 1n, types }, { deadlineMs: 5000 })) return m;
      return undefined;
    };
    await expect(refused([EventType.EVENT_TYPE_UNSPECIFIED])).rejects.toMatchObject({ code: Code.INVALID_ARGUMENT, reason: "EVENT_TYPE_INVALID" });
    await expect(refused([99])).rejects.toMatchObject({ code: Code.INVALID_ARGUMENT, reason: "EVENT_TYPE_INVALID" });
  });
});

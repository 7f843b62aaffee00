import { describe, expect, it } from "vitest";
import { Code, DomainError } from "@ioasid/errors";
import { isTransientJetStreamError, retryTransient } from "./jetstream-retry.js";

describe("isTransientJetStreamError", () => {
  it("takes what JetStream answers while a cluster elects leaders for transient", () => {
    expect(isTransientJetStreamError(new Error("TIMEOUT"))).toBe(true);
    expect(isTransientJetStreamError(new Error("503"))).toBe(true);
    expect(isTransientJetStreamError(Object.assign(new Error("JetStream not enabled"), { code: 503 }))).toBe(true);
    expect(isTransientJetStreamError(new Error("jetstream is not enabled"))).toBe(true);
    expect(isTransientJetStreamError(new Error("no responders available for request"))).toBe(true);
  });

  it("never takes a verdict about the data, or a stream that does not exist, for transient", () => {
    expect(
      isTransientJetStreamError(new DomainError(Code.FAILED_PRECONDITION, "HISTORY_FORMAT_UNSUPPORTED", "message 7 is not a history batch (timeout)")),
    ).toBe(false);
    expect(isTransientJetStreamError(new Error("stream not found"))).toBe(false);
    expect(isTransientJetStreamError(new Error("wrong last sequence: 41"))).toBe(false);
    // Words, not digits or fragments: message 1503 is not a 503, a "timeouts" setting not a timeout.
    expect(isTransientJetStreamError(new Error("entry at sequence 1503 is not a history batch"))).toBe(false);
    expect(isTransientJetStreamError(new Error("bad option ack_timeouts"))).toBe(false);
  });
});

describe("retryTransient", () => {
  it("reads again from scratch until a read succeeds", async () => {
    let calls = 0;
    const retried: number[] = [];
    const value = await retryTransient(
      () => {
        calls++;
        return calls < 3 ? Promise.reject(new Error("TIMEOUT")) : Promise.resolve("records");
      },
      { delayMs: 1, onRetry: (_err, attempt) => retried.push(attempt) },
    );
    expect(value).toBe("records");
    expect(calls).toBe(3);
    expect(retried).toEqual([1, 2]);
  });

  it("tries again what the caller's own predicate calls transient", async () => {
    let calls = 0;
    const value = await retryTransient(() => (++calls < 2 ? Promise.reject(new Error("read ended at message 3 of 9")) : Promise.resolve(calls)), {
      delayMs: 1,
      isTransient: (err) => /ended at message/.test(String(err)),
    });
    expect(value).toBe(2);
  });

  it("throws any other error at once, untouched", async () => {
    let calls = 0;
    const format = new DomainError(Code.FAILED_PRECONDITION, "HISTORY_FORMAT_UNSUPPORTED", "not a history batch");
    await expect(
      retryTransient(
        () => {
          calls++;
          return Promise.reject(format);
        },
        { delayMs: 1 },
      ),
    ).rejects.toBe(format);
    expect(calls).toBe(1);
  });

  it("gives up once the bound has passed since the first failure, saying how long it tried", async () => {
    let calls = 0;
    await expect(
      retryTransient(
        () => {
          calls++;
          return Promise.reject(new Error("TIMEOUT"));
        },
        { retryMs: 60, delayMs: 20 },
      ),
    ).rejects.toThrow(/^TIMEOUT \(JetStream still failing after \d+ tries over \d+ ms\)$/);
    // At least the first try and one more; never more than the bound allows (60 ms / 20 ms + 1).
    expect(calls).toBeGreaterThanOrEqual(2);
    expect(calls).toBeLessThanOrEqual(4);
  });
});

import { describe, expect, it } from "vitest";
import { DomainError, Code } from "@ioasid/errors";
import { iommu, vfio } from "@ioasid/proto";
import {
  answerFaultGroup,
  formatAnswer,
  formatTranslate,
  formatWatchItem,
  guestPagesOf,
  parseAddress,
  parseDmaOptions,
  parseGuestRamOptions,
  parseRespondOptions,
  parseWatchOptions,
  UsageError,
  watchItemJson,
  type DmaOptions,
} from "./faults.js";

const usage = (f: () => unknown) => expect(f).toThrow(UsageError);

describe("parseDmaOptions", () => {
  it("reads a PASID DMA with a group hint and --wait", () => {
    expect(
      parseDmaOptions({ device: "idxd0", pasid: "5", address: "0x200123", access: "rw", prgi: "7", last: true, wait: true, "timeout-ms": "2500" }),
    ).toEqual({
      deviceId: "idxd0",
      pasid: 5,
      withoutPasid: false,
      address: 0x200123n,
      access: { read: true, write: true },
      group: { prgi: 7, lastRequest: true },
      wait: true,
      timeoutMs: 2500,
      json: false,
    });
  });

  it("defaults to a read without a group hint, waiting 10 s when asked to wait", () => {
    const o = parseDmaOptions({ device: "d", "without-pasid": true, address: "4096" });
    expect(o).toMatchObject({ pasid: 0, withoutPasid: true, address: 4096n, access: { read: true, write: false }, wait: false, timeoutMs: 10_000 });
    expect(o.group).toBeUndefined();
  });

  it("refuses bad flags and combinations", () => {
    usage(() => parseDmaOptions({ pasid: "5", address: "0x1000" })); // no device
    usage(() => parseDmaOptions({ device: "d", address: "0x1000" })); // neither --pasid nor --without-pasid
    usage(() => parseDmaOptions({ device: "d", pasid: "5", "without-pasid": true, address: "0x1000" }));
    usage(() => parseDmaOptions({ device: "d", pasid: "0", address: "0x1000" })); // PASID 0 is RID_PASID
    usage(() => parseDmaOptions({ device: "d", pasid: "1048576", address: "0x1000" }));
    usage(() => parseDmaOptions({ device: "d", pasid: "5" })); // no address
    usage(() => parseDmaOptions({ device: "d", pasid: "5", address: "0x1g" }));
    usage(() => parseDmaOptions({ device: "d", pasid: "5", address: "0x1000", access: "x" }));
    usage(() => parseDmaOptions({ device: "d", pasid: "5", address: "0x1000", prgi: "3" })); // no --last/--not-last
    usage(() => parseDmaOptions({ device: "d", pasid: "5", address: "0x1000", prgi: "3", last: true, "not-last": true }));
    usage(() => parseDmaOptions({ device: "d", pasid: "5", address: "0x1000", prgi: "512", last: true }));
    usage(() => parseDmaOptions({ device: "d", pasid: "5", address: "0x1000", last: true })); // --last without --prgi
    usage(() => parseDmaOptions({ device: "d", pasid: "5", address: "0x1000", "timeout-ms": "100" })); // without --wait
    usage(() => parseDmaOptions({ device: "d", pasid: "5", address: "0x1000", wait: true, "timeout-ms": "0" }));
  });
});

describe("parseAddress", () => {
  it("takes decimal and 0x-hex up to 2^64-1, nothing else", () => {
    expect(parseAddress("0xFFFFFFFFFFFFFFFF", "a")).toBe((1n << 64n) - 1n);
    expect(parseAddress("12", "a")).toBe(12n);
    usage(() => parseAddress("0x10000000000000000", "a"));
    usage(() => parseAddress("-1", "a"));
    usage(() => parseAddress("", "a"));
    usage(() => parseAddress(true, "a"));
  });
});

describe("parseWatchOptions, parseRespondOptions, parseGuestRamOptions", () => {
  it("reads a watcher that answers SUCCESS at a GPA base, and one that only prints", () => {
    expect(parseWatchOptions({ vm: "vm1", respond: "SUCCESS", "map-gpa-base": "0x10000000", count: "2", "timeout-ms": "5000", json: true })).toEqual({
      vm: "vm1",
      respond: "success",
      mapGpaBase: 0x1000_0000n,
      count: 2,
      timeoutMs: 5000,
      json: true,
    });
    expect(parseWatchOptions({})).toEqual({ vm: undefined, mapGpaBase: 0n, json: false });
  });

  it("refuses a GPA base without --respond success, unaligned, and bad counts or codes", () => {
    usage(() => parseWatchOptions({ "map-gpa-base": "0x1000" }));
    usage(() => parseWatchOptions({ respond: "invalid", "map-gpa-base": "0x1000" }));
    usage(() => parseWatchOptions({ respond: "success", "map-gpa-base": "0x1001" }));
    usage(() => parseWatchOptions({ respond: "ok" }));
    usage(() => parseWatchOptions({ count: "0" }));
    usage(() => parseWatchOptions({ "timeout-ms": "soon" }));
  });

  it("reads an answer and refuses one without a group or a known code", () => {
    expect(parseRespondOptions({ vm: "vm1", group: "7", code: "invalid" })).toEqual({ vm: "vm1", faultGroupId: 7n, code: "invalid" });
    usage(() => parseRespondOptions({ vm: "vm1", code: "invalid" }));
    usage(() => parseRespondOptions({ vm: "vm1", group: "0", code: "invalid" }));
    usage(() => parseRespondOptions({ vm: "vm1", group: "7" }));
    usage(() => parseRespondOptions({ vm: "vm1", group: "7", code: "retry" }));
  });

  it("maps 1 GiB of guest RAM at GPA 0 to HPA 4 GiB by default; sizes and addresses are page aligned", () => {
    expect(parseGuestRamOptions({ vm: "vm1" })).toEqual({ vm: "vm1", gpa: 0n, size: 0x4000_0000n, hpa: undefined });
    expect(parseGuestRamOptions({ vm: "vm1", hpa: "0x100000000" })).toMatchObject({ hpa: 0x1_0000_0000n });
    usage(() => parseGuestRamOptions({ size: "0" }));
    usage(() => parseGuestRamOptions({ gpa: "0x800" }));
    usage(() => parseGuestRamOptions({ hpa: "0xFFFFFFFFFFFFF000", size: "0x2000" }));
  });
});

const dma: DmaOptions = {
  deviceId: "idxd0",
  pasid: 5,
  withoutPasid: false,
  address: 0x200123n,
  access: { read: true, write: true },
  wait: false,
  timeoutMs: 10_000,
  json: false,
};
const translated = (x: Partial<iommu.TranslateResponse>) => iommu.TranslateResponse.fromPartial(x);

describe("formatting", () => {
  it("says what a DMA became: the output address, the fault group, or the fault's reason", () => {
    expect(
      formatTranslate(dma, translated({ outcome: iommu.TranslateOutcome.TRANSLATE_OUTCOME_TRANSLATED, outputAddress: 0x1_0020_0123n, handleId: 3n })),
    ).toBe("TRANSLATED idxd0 PASID 5 0x200123 (rw) -> 0x100200123 (handle 3)");
    expect(formatTranslate(dma, translated({ outcome: iommu.TranslateOutcome.TRANSLATE_OUTCOME_PAGE_REQUEST, faultGroupId: 7n, groupComplete: false }))).toBe(
      "PAGE_REQUEST idxd0 PASID 5 0x200123 (rw): fault group 7 partial, waiting for its last request",
    );
    expect(
      formatTranslate(
        { ...dma, withoutPasid: true, pasid: 0 },
        translated({
          outcome: iommu.TranslateOutcome.TRANSLATE_OUTCOME_FAULT,
          faultReason: iommu.FaultReason.FAULT_REASON_PRI_CREDITS_EXHAUSTED,
          faultGroupId: 9n,
        }),
      ),
    ).toBe("FAULT idxd0 without PASID 0x200123 (rw): PRI_CREDITS_EXHAUSTED (group 9 answered INVALID)");
  });

  const group = vfio.FaultGroup.fromPartial({
    faultGroupId: 7n,
    device: { ref: { $case: "mdevUuid", value: "mdev-1" } },
    hpasid: 5,
    gpasid: 101,
    prgi: 3,
    requests: [
      { address: 0x200000n, access: { read: true }, lastRequest: false },
      { address: 0x201000n, access: { write: true }, lastRequest: false },
      { address: 0x200000n, access: { read: true, write: true }, lastRequest: true },
    ],
  });

  it("prints each WatchFaults item on one line, and as one JSON object", () => {
    const g = { item: { $case: "group" as const, value: group } };
    expect(formatWatchItem(g)).toBe("group 7  mdev mdev-1  hpasid 5 gpasid 101  prgi 3  requests 0x200000(r) 0x201000(w) 0x200000(rw,last)");
    expect(watchItemJson(g)).toMatchObject({
      kind: "group",
      faultGroupId: "7",
      device: { mdevUuid: "mdev-1" },
      hpasid: 5,
      gpasid: 101,
      prgi: 3,
      requests: [{ address: "0x200000", access: "r", lastRequest: false }, {}, {}],
    });
    const answered = {
      item: {
        $case: "answered" as const,
        value: { faultGroupId: 7n, code: vfio.PageResponseCode.PAGE_RESPONSE_CODE_INVALID, source: "PAGE_RESPONSE_SOURCE_TIMEOUT" },
      },
    };
    expect(formatWatchItem(answered)).toBe("answered group 7: INVALID by TIMEOUT");
    expect(watchItemJson(answered)).toEqual({ kind: "answered", faultGroupId: "7", code: "INVALID", source: "TIMEOUT" });
    const fault = {
      item: {
        $case: "fault" as const,
        value: vfio.FaultRecord.fromPartial({
          faultId: 2n,
          device: { ref: { $case: "deviceId", value: "0000:6a:01.0" } },
          hpasid: 5,
          gpasid: 101,
          address: 0x500000n,
          access: { write: true },
          reason: "FAULT_REASON_PERMISSION",
        }),
      },
    };
    expect(formatWatchItem(fault)).toBe("fault 2  device 0000:6a:01.0  hpasid 5 gpasid 101  0x500000(w)  PERMISSION");
  });

  it("installs each requested page once, at the GPA base plus its GVA page", () => {
    expect(guestPagesOf(group, 0x1000_0000n)).toEqual([
      { iova: 0x200000n, gpa: 0x1020_0000n },
      { iova: 0x201000n, gpa: 0x1020_1000n },
    ]);
    expect(guestPagesOf({ requests: [{ address: 0x3fffn, access: undefined, lastRequest: true }] }, 0n)).toEqual([{ iova: 0x3000n, gpa: 0x3000n }]);
  });

  it("answers SUCCESS after installing the pages, INVALID when a page cannot be installed, and reports a refused answer", async () => {
    const calls: string[] = [];
    const ok = {
      mapGuestPages: async (r: vfio.MapGuestPagesRequest) => {
        calls.push(`map ${r.iova.toString(16)}->${r.gpa.toString(16)}`);
        if (r.iova === 0x201000n) throw new DomainError(Code.ALREADY_EXISTS, "IOVA_ALREADY_MAPPED", "present");
        return {};
      },
      sendPageResponse: async (r: vfio.SendPageResponseRequest) => {
        calls.push(`respond ${r.faultGroupId} ${r.code}`);
        return {};
      },
    };
    const a = await answerFaultGroup(ok, 1, group, "success");
    expect(calls).toEqual(["map 200000->200000", "map 201000->201000", "respond 7 1"]);
    expect(a).toMatchObject({ code: "success", sent: true, present: 1, mapped: [{ iova: 0x200000n, gpa: 0x200000n }] });
    expect(formatAnswer(a)).toBe("installed 0x200000->gpa 0x200000 (1 already present); answered group 7 SUCCESS");

    const unbound = { ...ok, mapGuestPages: async () => Promise.reject(new DomainError(Code.NOT_FOUND, "GUEST_BIND_NOT_FOUND", "not bound")) };
    const b = await answerFaultGroup(unbound, 1, group, "success");
    expect(b).toMatchObject({ code: "invalid", sent: true, mapped: [] });
    expect(b.problem).toContain("GUEST_BIND_NOT_FOUND");

    const late = {
      ...ok,
      sendPageResponse: async () => Promise.reject(new DomainError(Code.FAILED_PRECONDITION, "FAULT_GROUP_ALREADY_RESPONDED", "answered INVALID (TIMEOUT)")),
    };
    const c = await answerFaultGroup(late, 1, group, "failure");
    expect(c).toMatchObject({ code: "failure", sent: false, mapped: [] });
    expect(formatAnswer(c)).toBe("group 7 not answered — answer refused: FAULT_GROUP_ALREADY_RESPONDED: answered INVALID (TIMEOUT)");
  });
});

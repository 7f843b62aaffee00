// Section `faults` (DESIGN §9 "IO page fault round trip"): IO page faults through the whole stack
// (processes). The fault round trip — a DMA miss (Translate → PAGE_REQUEST), the guest (a
// WatchFaults stream at VFIO, in this process) installing the page with MapGuestPages and answering
// SUCCESS, the device's AwaitPageResponse returning, the retry translating — against a bare gRPC
// unary call and a gRPC stream round trip to the echo service (a process too), measured in the same
// run; and sustained page requests/s across many devices, each request a group by itself, every
// group answered exactly once.
import { fileURLToPath } from "node:url";
import { answerFaultGroup } from "@ioasid/cli";
import { createClient } from "@ioasid/grpc-kit";
import { iommu, testing, vfio } from "@ioasid/proto";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { wholeStack } from "./guests.mjs";
import { fmt, now, percentile } from "./util.mjs";

/** Section `faults`: the fault round trip against its critical path, and sustained page requests. */
export async function faultsBench(ctx) {
  const { quick, log, results, target, phase, within, waitFor } = ctx;
  const rounds = quick ? 200 : 1000;
  const devices = 8;
  const inFlightPerDevice = 8; // below the IOMMU's default 32 page-request credits per device
  const perDevice = quick ? 250 : 1000;
  log(
    `\n[faults] the whole stack as processes; one VM, ${devices} PRI-capable devices assigned, a guest PASID bound on each, the guest answering on WatchFaults`,
  );
  const { c } = await wholeStack(ctx, "faults");
  const echoProc = await ctx.startService({ name: "echo", entry: fileURLToPath(new URL("./echo-server.mjs", import.meta.url)) });
  const echo = createClient(testing.EchoServiceClient, echoProc.address);
  const stop = new AbortController();
  try {
    phase("set-up: one VM, devices assigned, PASIDs bound");
    const opened = await c.vfio.openContainer(vfio.OpenContainerRequest.fromPartial({ mmToken: 0xfa17n, quota: 64, vmName: "bench-faults" }));
    const attached = new Promise((resolve, reject) => {
      void (async () => {
        try {
          for await (const m of c.vfio.session({ containerId: opened.containerId }, { signal: stop.signal })) if (m.event?.$case === "attached") resolve();
          reject(new Error("the VM's session ended before it attached"));
        } catch (err) {
          reject(err); // ended by the benchmark, or refused
        }
      })();
    });
    attached.catch(() => undefined);
    await within(attached, 30_000, "the VM's session to attach");
    const containerId = opened.containerId;
    const bound = [];
    for (let d = 0; d < devices; d++) {
      const deviceId = `pri${d}`;
      await c.iommu.registerDevice(
        iommu.RegisterDeviceRequest.fromPartial({
          deviceId,
          maxPasids: 1 << 20,
          priCapable: true,
          function: iommu.DeviceFunction.DEVICE_FUNCTION_PF,
          iommuGroup: 100 + d,
        }),
      );
      const device = { ref: { $case: "deviceId", value: deviceId } };
      // Right after the stack starts, VFIO's channel to the IOMMU may still be in grpc-js's
      // reconnect backoff (VFIO opened its fault stream before the IOMMU listened): its calls to
      // the IOMMU fail UNAVAILABLE for up to a second. A refused assignment changes nothing: retry.
      for (let attempt = 0; ; attempt++) {
        try {
          await c.vfio.assignDevice(vfio.AssignDeviceRequest.fromPartial({ containerId, device }));
          break;
        } catch (err) {
          if (err.reason !== "UNAVAILABLE" || attempt >= 50) throw err;
          await new Promise((r) => setTimeout(r, 100));
        }
      }
      const a = await c.vfio.allocPasid({ containerId });
      await c.vfio.bindGuestPasid(
        vfio.BindGuestPasidRequest.fromPartial({ containerId, device, hpasid: a.hpasid, generation: a.generation, gpasid: d + 1, guestPgtable: 0x1000n }),
      );
      bound.push({ deviceId, pasid: a.hpasid });
    }
    // Guest RAM: GPA [0, 1 GiB) → the 1 GiB of host memory VFIO gave the VM (MapDma maps nothing
    // else), in the VM's stage 2; the guest maps GVA = GPA.
    const hpaBase = opened.guestMemory[0].paddr;
    await c.vfio.mapDma({ containerId, iova: 0n, paddr: hpaBase, size: 0x4000_0000n, access: { read: true, write: true, execute: false, privileged: false } });
    /** Device d's pages: a 64 MiB window of its own (the round trips use device 0's from page 0, the sustained run from page 8192). */
    const gva = (d, page) => 0x1000_0000n + BigInt(d) * 0x400_0000n + BigInt(page) * 0x1000n;

    // The guest: every relayed group gets its pages installed and SUCCESS; every answer is counted.
    const relayed = new Map();
    const answers = new Map();
    const refused = [];
    /** When each step of a group's answer happened (`now()`, ms), by group id: where a round trip's time goes. */
    const stepsAt = new Map();
    const timedVfio = (at) => ({
      mapGuestPages: (req) => c.vfio.mapGuestPages(req).finally(() => (at.mapped = now())),
      sendPageResponse: (req) => c.vfio.sendPageResponse(req).finally(() => (at.answered = now())),
    });
    void (async () => {
      for await (const m of c.vfio.watchFaults({ containerId }, { signal: stop.signal })) {
        if (m.item?.$case === "group") {
          const g = m.item.value;
          const at = { relayed: now() };
          if (stepsAt.size < 10_000) stepsAt.set(g.faultGroupId, at);
          relayed.set(g.faultGroupId, (relayed.get(g.faultGroupId) ?? 0) + 1);
          void answerFaultGroup(timedVfio(at), containerId, g, "success").then((a) => a.sent || refused.push(`${a.faultGroupId}: ${a.problem}`));
        } else if (m.item?.$case === "answered") {
          const a = m.item.value;
          answers.set(a.faultGroupId, [...(answers.get(a.faultGroupId) ?? []), `${vfio.pageResponseCodeToJSON(a.code)} ${a.source}`]);
        }
      }
    })().catch(() => undefined);
    await waitFor(async () => (await c.vfio.queryState({ containerId })).containers[0]?.faultWatcherAttached === true, {
      timeoutMs: 10_000,
      what: "the benchmark's WatchFaults to attach",
    });

    const rw = { read: true, write: true };
    const { TRANSLATE_OUTCOME_TRANSLATED: TRANSLATED, TRANSLATE_OUTCOME_PAGE_REQUEST: PAGE_REQUEST } = iommu.TranslateOutcome;
    /** One DMA to a page the guest has not installed yet: page request, response, retry. @returns the group id */
    const roundTrip = async ({ deviceId, pasid }, address, steps) => {
      const req = iommu.TranslateRequest.fromPartial({ deviceId, pasid, address, access: rw });
      const start = now();
      const miss = await c.iommu.translate(req);
      const missed = now();
      if (miss.outcome !== PAGE_REQUEST)
        throw new Error(`expected a page request at 0x${address.toString(16)}, got ${iommu.translateOutcomeToJSON(miss.outcome)}`);
      const r = await c.iommu.awaitPageResponse({ deviceId, faultGroupId: miss.faultGroupId }, { deadlineMs: 10_000 });
      const released = now();
      if (r.code !== iommu.PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS)
        throw new Error(`group ${miss.faultGroupId} answered ${iommu.pageResponseCodeToJSON(r.code)}`);
      const hit = await c.iommu.translate(req);
      const end = now();
      if (hit.outcome !== TRANSLATED || hit.outputAddress !== hpaBase + address)
        throw new Error(`retry of 0x${address.toString(16)}: ${iommu.translateOutcomeToJSON(hit.outcome)}`);
      const at = stepsAt.get(miss.faultGroupId);
      stepsAt.delete(miss.faultGroupId);
      // Each step from the end of the one before; the guest's steps run beside the device's wait.
      if (steps !== undefined && at?.mapped !== undefined && at.answered !== undefined)
        steps.push({
          translateMiss: missed - start,
          relayToGuest: at.relayed - start,
          mapGuestPages: at.mapped - at.relayed,
          sendPageResponse: at.answered - at.mapped,
          deviceReleased: released - at.answered,
          retryTranslated: end - released,
        });
      return miss.faultGroupId;
    };

    // Round trips, sequential, on distinct pages; the floors interleaved with them so drift hits all alike.
    phase("sequential fault round trips");
    const payload = { payload: Buffer.alloc(8) };
    const bidi = echo.echoStream();
    const streamReplies = bidi.responses[Symbol.asyncIterator]();
    const raised = [];
    let page = 0;
    for (let i = 0; i < 100; i++) {
      await echo.echo(payload);
      await bidi.send(payload);
      await streamReplies.next();
      raised.push(await roundTrip(bound[0], gva(0, page++)));
    }
    const unaryLat = [];
    const streamLat = [];
    const tripLat = [];
    const tripSteps = [];
    for (let r = 0; r < 5; r++) {
      for (let i = 0; i < rounds / 5; i++) {
        const t = now();
        await echo.echo(payload);
        unaryLat.push(now() - t);
      }
      for (let i = 0; i < rounds / 5; i++) {
        const t = now();
        await bidi.send(payload);
        await streamReplies.next();
        streamLat.push(now() - t);
      }
      for (let i = 0; i < rounds / 5; i++) {
        const t = now();
        raised.push(await roundTrip(bound[0], gva(0, page++), tripSteps));
        tripLat.push(now() - t);
      }
    }
    bidi.end();
    // The IOMMU keeps its fault groups and guest page tables in JetStream (crash-safe roles): the
    // third floor, a bare JetStream publish ack on the stack's own nats-server.
    const jsLat = [];
    {
      // The operator's connection (the stack runs with a NATS user per role: an anonymous one is refused).
      const nc = c.nc;
      const js = jetstream(nc);
      await (await jetstreamManager(nc)).streams.add({ name: "BENCH_FAULTS_FLOOR", subjects: ["bench.faults.floor"], storage: "file" });
      for (let i = 0; i < 100; i++) await js.publish("bench.faults.floor", "{}");
      for (let i = 0; i < rounds; i++) {
        const t = now();
        await js.publish("bench.faults.floor", '{"key":"fg/1","value":{}}');
        jsLat.push(now() - t);
      }
    }
    for (const xs of [unaryLat, streamLat, tripLat, jsLat]) xs.sort((a, b) => a - b);
    const u50 = percentile(unaryLat, 50);
    const s50 = percentile(streamLat, 50);
    const j50 = percentile(jsLat, 50);
    const t50 = percentile(tripLat, 50);
    const t90 = percentile(tripLat, 90);
    // The round trip's critical path: Translate, MapGuestPages (VMM → VFIO → IOMMU) and
    // SendPageResponse (VMM → VFIO → IOMMU, whose answer releases the device's AwaitPageResponse),
    // the retry — 6 unary calls — the group's two one-way stream pushes (IOMMU → VFIO → VMM), about
    // one stream round trip, and three JetStream acks: the IOMMU keeps the new group (Translate),
    // the guest's page (MapGuestPages) and the answer (SendPageResponse) before it replies.
    const floor = 6 * u50 + s50 + 3 * j50;
    log(`  gRPC unary echo (floor)        p50 ${fmt(u50 * 1000)} µs`);
    log(`  gRPC stream round trip (floor) p50 ${fmt(s50 * 1000)} µs`);
    log(`  JetStream publish ack (floor)  p50 ${fmt(j50 * 1000)} µs`);
    log(
      `  fault round trip               p50 ${fmt(t50 * 1000)} µs   p90 ${fmt(t90 * 1000)} µs   (${fmt(rounds)} sequential, distinct pages: miss → guest maps + SUCCESS → retry TRANSLATED)`,
    );
    // Where a round trip's time goes: p50 of each step (they need not add up to the p50 of the whole).
    const stepP50 = Object.fromEntries(
      Object.keys(tripSteps[0] ?? {}).map((k) => [
        k,
        percentile(
          tripSteps.map((st) => st[k]).sort((a, b) => a - b),
          50,
        ) * 1000,
      ]),
    );
    log(
      `  its steps, p50 (${fmt(tripSteps.length)} timed)  ${Object.entries(stepP50)
        .map(([k, us]) => `${k} ${fmt(us)}`)
        .join(", ")} µs — the miss's reply and the group's relay to the guest start together`,
    );
    log(
      `  ratio to its critical path     ${fmt(t50 / floor, 2)}×   (6 unary + 1 stream round trip + 3 JetStream acks = ${fmt(floor * 1000)} µs; ${fmt(t50 / u50, 1)} unary calls' worth)`,
    );
    results.faults = {
      unaryP50Us: u50 * 1000,
      streamP50Us: s50 * 1000,
      jetstreamAckP50Us: j50 * 1000,
      roundTripP50Us: t50 * 1000,
      roundTripP90Us: t90 * 1000,
      criticalPathFloorUs: floor * 1000,
      ratioToFloor: t50 / floor,
      roundTripStepsP50Us: stepP50,
    };

    // Sustained: every device with several requests in flight, each a group by itself.
    target("faults.roundTrip", {
      figure: `${fmt(t50 * 1000)} µs p50`,
      floor: `${fmt(floor * 1000)} µs (critical path)`,
      ratio: `${fmt(t50 / floor, 2)}× floor`,
      met: t50 / floor <= 1.5,
    });
    phase("sustained page requests", () => `${raised.length} page requests raised`);
    const codes = new Map();
    const t0 = now();
    await Promise.all(
      bound.flatMap((dev, d) => {
        let next = 0;
        return Array.from({ length: inFlightPerDevice }, async () => {
          while (next < perDevice) {
            const address = gva(d, 8192 + next++);
            const miss = await c.iommu.translate(iommu.TranslateRequest.fromPartial({ deviceId: dev.deviceId, pasid: dev.pasid, address, access: rw }));
            if (miss.outcome !== PAGE_REQUEST)
              throw new Error(`expected a page request, got ${iommu.translateOutcomeToJSON(miss.outcome)} ${iommu.faultReasonToJSON(miss.faultReason)}`);
            raised.push(miss.faultGroupId);
            const r = await c.iommu.awaitPageResponse({ deviceId: dev.deviceId, faultGroupId: miss.faultGroupId }, { deadlineMs: 15_000 });
            const k = iommu.pageResponseCodeToJSON(r.code);
            codes.set(k, (codes.get(k) ?? 0) + 1);
          }
        });
      }),
    );
    const elapsed = now() - t0;
    const requests = devices * perDevice;
    // Every group: relayed once, answered once (the answered items trail the devices' answers a little).
    for (let i = 0; i < 500 && answers.size < raised.length; i++) await new Promise((r) => setTimeout(r, 10));
    const wrong = raised.filter(
      (id) => relayed.get(id) !== 1 || answers.get(id)?.length !== 1 || answers.get(id)[0] !== "PAGE_RESPONSE_CODE_SUCCESS PAGE_RESPONSE_SOURCE_HANDLER",
    );
    const raisedSet = new Set(raised);
    const extra = [...answers.keys()].filter((id) => !raisedSet.has(id)).length;
    const left = (await c.iommu.queryState(iommu.QueryStateRequest.fromPartial({}))).faultGroups.length;
    // The pages are really there: a sample of the sustained run's pages translates.
    let hits = 0;
    for (let d = 0; d < devices; d++) {
      for (let i = 0; i < 8; i++) {
        const address = gva(d, 8192 + Math.floor((i * perDevice) / 8));
        const r = await c.iommu.translate(iommu.TranslateRequest.fromPartial({ deviceId: bound[d].deviceId, pasid: bound[d].pasid, address, access: rw }));
        if (r.outcome === TRANSLATED && r.outputAddress === hpaBase + address) hits++;
      }
    }
    log(
      `  sustained                      ${fmt(requests / (elapsed / 1000))} page requests/s answered (${fmt(requests)} over ${devices} devices × ${inFlightPerDevice} in flight, each a group answered SUCCESS after MapGuestPages; ${fmt(elapsed)} ms)`,
    );
    log(
      `  exactly one response           ${fmt(raised.length - wrong.length)} of ${fmt(raised.length)} groups relayed once and answered once (SUCCESS by the handler); ${extra} unknown answers, ${left} groups left outstanding, ${refused.length} answers refused; devices saw ${[...codes].map(([k, n]) => `${n} ${k.replace("PAGE_RESPONSE_CODE_", "")}`).join(", ")}; ${hits}/${devices * 8} sampled pages translate`,
    );
    if (wrong.length > 0 || extra > 0 || left > 0 || refused.length > 0)
      log(
        `  ! not exactly one response: ${wrong
          .slice(0, 5)
          .map((id) => `${id}: relayed ${relayed.get(id) ?? 0}, answers ${JSON.stringify(answers.get(id) ?? [])}`)
          .join("; ")} ${refused.slice(0, 3).join("; ")}`,
      );
    results.faults = {
      ...results.faults,
      sustainedRequestsPerSec: requests / (elapsed / 1000),
      devices,
      inFlightPerDevice,
      groups: raised.length,
      groupsAnsweredOnce: raised.length - wrong.length,
      unknownAnswers: extra,
      outstandingAtEnd: left,
      refused: refused.length,
    };
  } finally {
    stop.abort();
    echo.close();
  }
}

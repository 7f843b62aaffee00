import type { ParseArgsConfig } from "node:util";
import { isDomainError } from "@ioasid/errors";
import { iommu } from "@ioasid/proto";
import type { StackClients } from "./clients.js";
import {
  answerFaultGroup,
  answerJson,
  codeName,
  DEFAULT_DMA_TIMEOUT_MS,
  describeError,
  formatAnswer,
  formatTranslate,
  formatWatchItem,
  GUEST_RAM_DEFAULTS,
  jsonLine,
  parseDmaOptions,
  parseGuestRamOptions,
  parseRespondOptions,
  parseWatchOptions,
  RESPONSE_CODES,
  sourceName,
  translateJson,
  UsageError,
  type DmaOptions,
  type GuestRamOptions,
  type RespondOptions,
  watchItemJson,
  type WatchOptions,
} from "./faults.js";
import { ExitCode } from "./usage-error.js";

/** A VM as `ioasidctl vm create` recorded it. */
export interface VmRef {
  readonly name: string;
  readonly containerId: number;
  readonly setId: number;
}

/** What the fault commands need from the CLI: the stack of a --dir, its VMs, and output. */
export interface FaultCommandContext {
  withStack<T>(dir: string, fn: (c: StackClients) => Promise<T>): Promise<T>;
  findVm(dir: string, name: string | undefined): VmRef;
  /** A line on stdout. */
  out(line: string): void;
  /** A line on stderr (status, refusals). */
  err(line: string): void;
}

/** An ioasidctl command (the shape main.ts registers). */
export interface FaultCommand {
  readonly summary: string;
  readonly usage: string;
  readonly options: NonNullable<ParseArgsConfig["options"]>;
  readonly run: (values: Record<string, string | boolean | undefined>, positionals: string[]) => Promise<number>;
}

const dirOption = { dir: { type: "string", default: ".ioasid" } } as const;
const hex = (n: bigint) => `0x${n.toString(16)}`;

function verb(positionals: string[], expected: string, command: string): void {
  if (positionals.length !== 1 || positionals[0] !== expected)
    throw new UsageError(`the verb is "${expected}": ioasidctl ${command} ${expected} …${positionals.length === 0 ? "" : ` (got "${positionals.join(" ")}")`}`);
}

/**
 * The fault commands: `dma`, `faults watch`, `fault respond`, `guest-ram`, for main.ts's command
 * table.
 */
export function faultCommands(ctx: FaultCommandContext): Record<string, FaultCommand> {
  const dmaUsage =
    "ioasidctl dma --device DEV (--pasid HPASID | --without-pasid) --address ADDR [--access r|w|rw] [--prgi N --last|--not-last] [--wait [--timeout-ms 10000]] [--json]\n" +
    "  a device's DMA through the IOMMU: TRANSLATED (output address), PAGE_REQUEST (fault group id) or FAULT (reason).\n" +
    "  --prgi puts the page request in a multi-request group (--last completes it); without, a miss is a group by itself.\n" +
    `  --wait: on a page request, wait for its response (at most --timeout-ms, default ${DEFAULT_DMA_TIMEOUT_MS}) and on SUCCESS retry once.\n` +
    "  exit 0 when the DMA translated (or, without --wait, a page request was queued); 3 (refused) on a fault, a response\n" +
    "  other than SUCCESS, or a retry that does not translate; 1 when no response came in time; 2 on bad flags.";
  const watchUsage =
    "ioasidctl faults watch --vm NAME [--respond success|invalid|failure] [--map-gpa-base ADDR] [--count N] [--timeout-ms N] [--json]\n" +
    "  the VM's WatchFaults stream at VFIO, one line per item: group (id, device, hpasid/gpasid, prgi, requests),\n" +
    "  fault (unrecoverable: reason, address), answered (code, who answered). --json: one JSON object per line.\n" +
    "  --respond success plays the guest: each requested GVA page is installed at GPA map-gpa-base + GVA page (default base 0:\n" +
    "  GPA = GVA; the GPA must be guest RAM, see `ioasidctl guest-ram`), then the group is answered SUCCESS.\n" +
    "  --respond invalid|failure only answers. Stops after --count items, --timeout-ms, or Ctrl-C.\n" +
    "  One watcher per container: a second `faults watch` replaces the first (which then exits 1).\n" +
    "  A group raised while nobody watches is answered FAILURE at once (no handler).";
  const respondUsage =
    "ioasidctl fault respond --vm NAME --group ID --code success|invalid|failure\n" +
    "  answers one fault group relayed to the VM (SendPageResponse through VFIO); a refusal (FAULT_GROUP_ALREADY_RESPONDED,\n" +
    "  FAULT_GROUP_NOT_GIVEN…) is printed with its reason and exits 1. VFIO refuses failure from a VMM (INVALID_FIELD):\n" +
    "  FAILURE disables PRI for the whole function, so it is the host's answer alone.";
  const ramUsage =
    `ioasidctl guest-ram --vm NAME [--gpa ${hex(GUEST_RAM_DEFAULTS.gpa)}] [--size ${hex(GUEST_RAM_DEFAULTS.size)}] [--hpa ADDR]\n` +
    "  the VMM maps guest RAM (GPA → HPA, read+write) into the VM's stage 2 with VFIO MapDma (VFIO_IOMMU_MAP_DMA).\n" +
    "  Nested DMA translates GVA → GPA (the guest's pages) → HPA (this). The host memory must be the VM's: VFIO gave\n" +
    "  its container host memory at open (`inspect` shows it) and refuses any other (HOST_MEMORY_NOT_GIVEN);\n" +
    "  --hpa defaults to the start of it.";

  /** Runs `fn` with the stack of --dir and the VM named (or the only one). */
  const onVm = (v: Record<string, string | boolean | undefined>, name: string | undefined, fn: (c: StackClients, vm: VmRef) => Promise<number>) => {
    const dir = v["dir"] as string;
    const vm = ctx.findVm(dir, name);
    return ctx.withStack(dir, (c) => fn(c, vm));
  };

  return {
    dma: {
      summary: "a device's DMA through the IOMMU (Translate); --wait: page request → response → retry",
      usage: dmaUsage,
      options: {
        ...dirOption,
        device: { type: "string" },
        pasid: { type: "string" },
        "without-pasid": { type: "boolean", default: false },
        address: { type: "string" },
        access: { type: "string" },
        prgi: { type: "string" },
        last: { type: "boolean", default: false },
        "not-last": { type: "boolean", default: false },
        wait: { type: "boolean", default: false },
        "timeout-ms": { type: "string" },
        json: { type: "boolean", default: false },
      },
      run: async (v, pos) => {
        if (pos.length > 0) throw new UsageError(`dma takes no positional arguments (got "${pos.join(" ")}")`);
        const o = parseDmaOptions(v);
        return ctx.withStack(v["dir"] as string, (c) => runDma(c, o, ctx));
      },
    },
    faults: {
      summary: "watch a VM's IO page faults (`faults watch --vm NAME`), optionally answering as the guest",
      usage: watchUsage,
      options: {
        ...dirOption,
        vm: { type: "string" },
        respond: { type: "string" },
        "map-gpa-base": { type: "string" },
        count: { type: "string" },
        "timeout-ms": { type: "string" },
        json: { type: "boolean", default: false },
      },
      run: async (v, pos) => {
        verb(pos, "watch", "faults");
        const o = parseWatchOptions(v);
        return onVm(v, o.vm, (c, vm) => runWatch(c, vm, o, ctx));
      },
    },
    fault: {
      summary: "answer one fault group: `fault respond --vm NAME --group ID --code success|invalid|failure`",
      usage: respondUsage,
      options: { ...dirOption, vm: { type: "string" }, group: { type: "string" }, code: { type: "string" } },
      run: async (v, pos) => {
        verb(pos, "respond", "fault");
        const o = parseRespondOptions(v);
        return onVm(v, o.vm, (c, vm) => runRespond(c, vm, o, ctx));
      },
    },
    "guest-ram": {
      summary: "map a VM's guest RAM (GPA → HPA) into its stage-2 domain, so nested DMA can complete",
      usage: ramUsage,
      options: { ...dirOption, vm: { type: "string" }, gpa: { type: "string" }, size: { type: "string" }, hpa: { type: "string" } },
      run: async (v, pos) => {
        if (pos.length > 0) throw new UsageError(`guest-ram takes no positional arguments (got "${pos.join(" ")}")`);
        const o = parseGuestRamOptions(v);
        return onVm(v, o.vm, (c, vm) => runGuestRam(c, vm, o, ctx));
      },
    },
  };
}

const { TRANSLATE_OUTCOME_TRANSLATED: TRANSLATED, TRANSLATE_OUTCOME_PAGE_REQUEST: PAGE_REQUEST } = iommu.TranslateOutcome;

/** `dma`: one Translate; with --wait, the PRI round trip (AwaitPageResponse, then one retry). */
async function runDma(c: StackClients, o: DmaOptions, ctx: FaultCommandContext): Promise<number> {
  const translate = (hint: DmaOptions["group"]) =>
    c.iommu.translate(
      iommu.TranslateRequest.fromPartial({
        deviceId: o.deviceId,
        pasid: o.pasid,
        withoutPasid: o.withoutPasid,
        address: o.address,
        access: o.access,
        ...(hint === undefined ? {} : { pageRequestGroup: hint }),
      }),
    );
  const report: Record<string, unknown> = {};
  const done = (code: number) => {
    if (o.json) ctx.out(jsonLine(report));
    return code;
  };
  const first = await translate(o.group);
  report["translate"] = translateJson(first);
  if (!o.json) ctx.out(formatTranslate(o, first));
  if (first.outcome !== PAGE_REQUEST) return done(first.outcome === TRANSLATED ? ExitCode.OK : ExitCode.REFUSED);
  if (!o.wait) return done(ExitCode.OK);

  let answer: iommu.AwaitPageResponseResponse;
  try {
    answer = await c.iommu.awaitPageResponse({ deviceId: o.deviceId, faultGroupId: first.faultGroupId }, { deadlineMs: o.timeoutMs });
  } catch (err) {
    if (!isDomainError(err, "DEADLINE_EXCEEDED")) throw err;
    report["response"] = null;
    if (!o.json) ctx.out(`no page response for group ${first.faultGroupId} within ${o.timeoutMs} ms`);
    return done(ExitCode.FAILED);
  }
  report["response"] = { code: codeName(answer.code), source: sourceName(answer.source) };
  const success = answer.code === iommu.PageResponseCode.PAGE_RESPONSE_CODE_SUCCESS;
  if (!o.json) {
    const then = success
      ? "the device retries"
      : answer.code === iommu.PageResponseCode.PAGE_RESPONSE_CODE_FAILURE
        ? "the device gives up (PRI disabled until reset)"
        : "the device gives up on this DMA";
    ctx.out(`page response for group ${first.faultGroupId}: ${codeName(answer.code)} by ${sourceName(answer.source)}; ${then}`);
  }
  // The device gives up on the DMA: the hardware refused it.
  if (!success) return done(ExitCode.REFUSED);
  // The retry is a new request: a miss now is a page request of its own, not part of the old group.
  const retry = await translate(undefined);
  report["retry"] = translateJson(retry);
  if (!o.json) ctx.out(`retry: ${formatTranslate(o, retry)}`);
  return done(retry.outcome === TRANSLATED ? ExitCode.OK : ExitCode.REFUSED);
}

/** `faults watch`: the container's WatchFaults stream until --count, --timeout-ms, Ctrl-C or its end. */
async function runWatch(c: StackClients, vm: VmRef, o: WatchOptions, ctx: FaultCommandContext): Promise<number> {
  const ac = new AbortController();
  let stopped: "count" | "timeout" | "signal" | undefined;
  const stop = (why: NonNullable<typeof stopped>) => {
    stopped ??= why;
    ac.abort();
  };
  const onSignal = () => stop("signal");
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);
  const timer = o.timeoutMs === undefined ? undefined : setTimeout(() => stop("timeout"), o.timeoutMs);
  const counts = { items: 0, group: 0, fault: 0, answered: 0 };
  let ended = false;
  const reading = (async () => {
    try {
      for await (const m of c.vfio.watchFaults({ containerId: vm.containerId }, { signal: ac.signal })) {
        const kind = m.item?.$case;
        if (kind === undefined) continue;
        counts.items++;
        counts[kind]++;
        ctx.out(o.json ? jsonLine(watchItemJson(m)) : formatWatchItem(m));
        if (m.item?.$case === "group" && o.respond !== undefined) {
          const a = await answerFaultGroup(c.vfio, vm.containerId, m.item.value, o.respond, o.mapGpaBase);
          ctx.out(o.json ? jsonLine(answerJson(a)) : formatAnswer(a));
        }
        if (o.count !== undefined && counts.items >= o.count) {
          stop("count");
          break;
        }
      }
    } finally {
      ended = true;
    }
  })();
  // Say when the watcher is attached (scripts start the DMA after this line): a group raised
  // before would find no watcher and be answered FAILURE.
  const announced = (async () => {
    for (let i = 0; i < 100 && !ended; i++) {
      const { containers } = await c.vfio.queryState({ containerId: vm.containerId }).catch(() => ({ containers: [] }));
      if (containers[0]?.faultWatcherAttached === true) {
        ctx.err(
          `watching IO page faults of vm ${vm.name} (container ${vm.containerId}, set ${vm.setId})${o.respond === undefined ? "" : `, answering ${o.respond.toUpperCase()}`}; Ctrl-C to stop`,
        );
        return;
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  })();
  let code = 0;
  try {
    await reading;
    if (stopped === undefined) ctx.err(`the container of vm ${vm.name} closed: the fault stream ended`);
  } catch (err) {
    if (stopped === undefined) {
      code = 1;
      ctx.err(
        isDomainError(err, "FAULT_WATCHER_REPLACED")
          ? `replaced by a newer \`faults watch\` of vm ${vm.name}: ${describeError(err)}`
          : `the fault stream failed: ${describeError(err)}`,
      );
    }
  } finally {
    if (timer !== undefined) clearTimeout(timer);
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
    ac.abort();
  }
  await announced;
  if (stopped === "timeout" && o.count !== undefined) {
    code = 1;
    ctx.err(`timed out after ${o.timeoutMs} ms with ${counts.items} of ${o.count} item(s)`);
  }
  ctx.err(`${counts.items} item(s): ${counts.group} group(s), ${counts.answered} answer(s), ${counts.fault} fault(s)`);
  return code;
}

/** `fault respond`: one SendPageResponse through VFIO; a refusal is printed with its reason. */
async function runRespond(c: StackClients, vm: VmRef, o: RespondOptions, ctx: FaultCommandContext): Promise<number> {
  try {
    await c.vfio.sendPageResponse({ containerId: vm.containerId, faultGroupId: o.faultGroupId, code: RESPONSE_CODES[o.code] });
  } catch (err) {
    if (!isDomainError(err)) throw err;
    ctx.err(`group ${o.faultGroupId} not answered: ${describeError(err)}`);
    return 1;
  }
  ctx.out(`group ${o.faultGroupId} answered ${o.code.toUpperCase()} (vm ${vm.name}, container ${vm.containerId})`);
  return 0;
}

/** `guest-ram`: the VMM's VFIO MapDma of guest RAM into the VM's stage 2. */
async function runGuestRam(c: StackClients, vm: VmRef, o: GuestRamOptions, ctx: FaultCommandContext): Promise<number> {
  // The VMM maps only host memory VFIO gave its VM (issue 14): by default, the start of it.
  const hpa = o.hpa ?? (await c.vfio.queryState({ containerId: vm.containerId })).containers[0]?.guestMemory[0]?.paddr;
  if (hpa === undefined) {
    ctx.err(`vm ${vm.name}: VFIO gave container ${vm.containerId} no host memory; pass --hpa`);
    return 1;
  }
  await c.vfio.mapDma({
    containerId: vm.containerId,
    iova: o.gpa,
    paddr: hpa,
    size: o.size,
    access: { read: true, write: true, execute: false, privileged: false },
  });
  ctx.out(
    `vm ${vm.name}: guest RAM GPA ${hex(o.gpa)}..${hex(o.gpa + o.size - 1n)} -> HPA ${hex(hpa)}..${hex(hpa + o.size - 1n)} (rw) in its stage 2 (VFIO MapDma)`,
  );
  return 0;
}

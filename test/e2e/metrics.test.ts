import { readFileSync } from "node:fs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code } from "@ioasid/errors";
import { core as coreProto } from "@ioasid/proto";
import { renderTable, renderVerdict, runScenario, ScenarioKind } from "@ioasid/cli";
import { startStack, type StackFixture } from "../support/stack-fixture.js";
import { scrape, total, type Sample } from "../support/prometheus-text.js";

// DESIGN §13 "Metrics": every service serves Prometheus text on a port of its own. The stack runs
// as processes (a real nats-server, mTLS, the core authorizing by role), each with an ephemeral
// metrics port; the misbehaving-guest life cycle (alloc, bind, FREE before unbind: the FREE goes to
// KVM (CPU), VDCM (DEVICE) and the IOMMU, each acknowledging with its release, then the reclaim)
// runs through VFIO, and the scraped numbers must tell that story.

let stack: StackFixture;
beforeAll(async () => {
  stack = await startStack({ IOASID_METRICS_PORT: "0" });
}, 60_000);
afterAll(async () => {
  await stack?.stop();
});

type Service = keyof StackFixture["procs"];
const SERVICES: readonly Service[] = ["core", "iommu", "kvm", "vdcm", "vfio"];

async function scrapeAll(): Promise<Record<Service, Sample[]>> {
  const pairs = await Promise.all(SERVICES.map(async (s) => [s, await scrape(urlOf(s))] as const));
  return Object.fromEntries(pairs) as Record<Service, Sample[]>;
}

function urlOf(s: Service): string {
  const url = stack.procs[s].metricsUrl;
  if (url === undefined) throw new Error(`${s} logged no "metrics listening" line`);
  return url;
}

/** How much a counter grew between two scrapes. */
function grew(before: Sample[], after: Sample[], name: string, labels: Record<string, string> = {}): number {
  return total(after, name, labels) - total(before, name, labels);
}

describe("metrics endpoints of the stack", () => {
  it("every service serves Prometheus text on GET /metrics on loopback, and nothing else", async () => {
    for (const s of SERVICES) {
      const url = new URL(urlOf(s));
      expect(url.hostname, s).toBe("127.0.0.1");
      expect(url.pathname, s).toBe("/metrics");
      const samples = await scrape(url.href);
      expect(total(samples, "process_cpu_user_seconds_total"), s).toBeGreaterThan(0);
      expect((await fetch(new URL("/other", url))).status, s).toBe(404);
      expect((await fetch(url, { method: "POST" })).status, s).toBe(405);
    }
  });

  it("after a guest's life cycle: deliveries by tier acked, the reclaim timed, IOASIDs and references as the core lists them", async () => {
    const before = await scrapeAll();
    const r = await runScenario(ScenarioKind.CRASH, stack.clients);
    expect(r.verdict.ok, `${renderTable(r.rows)}\n${renderVerdict(r.verdict)}`).toBe(true);
    // A refusal by a handler and one by the authorization interceptor (before any handler).
    await expect(stack.clients.core.describe({ ioasid: 0 })).rejects.toMatchObject({ code: Code.INVALID_ARGUMENT });
    await expect(stack.clients.core.attachSpid({ setId: r.setId, ioasid: r.hpasid, spid: 1, generation: 0 })).rejects.toMatchObject({
      code: Code.PERMISSION_DENIED,
    });
    const after = await scrapeAll();
    const core = (name: string, labels: Record<string, string> = {}) => grew(before.core, after.core, name, labels);

    // The FREE went to each tier in turn and each acknowledged: nothing missed (DESIGN §4).
    for (const tier of ["CPU", "DEVICE", "IOMMU"]) {
      expect(core("ioasid_deliveries_total", { tier, outcome: "acked" }), tier).toBeGreaterThanOrEqual(1);
      expect(core("ioasid_delivery_seconds_count", { tier, outcome: "acked" }), tier).toBe(core("ioasid_deliveries_total", { tier, outcome: "acked" }));
    }
    expect(core("ioasid_deliveries_total", { outcome: "missed" })).toBe(0);
    expect(core("ioasid_delivery_misses_total")).toBe(0);
    expect(total(after.core, "ioasid_delivery_backlog")).toBe(0);
    expect(core("ioasid_events_total", { type: "FREE" })).toBeGreaterThanOrEqual(1);
    // The scenario's "new life cycle" frees an IOASID nobody else holds: reclaimed at once, no FREE.
    expect(core("ioasid_events_total", { type: "RECLAIM" })).toBeGreaterThanOrEqual(core("ioasid_events_total", { type: "FREE" }));
    // Each FREE (references outstanding) is timed to its RECLAIM, when the last one was released.
    expect(core("ioasid_reclaim_seconds_count")).toBe(core("ioasid_events_total", { type: "FREE" }));
    expect(core("ioasid_oplog_write_seconds_count")).toBeGreaterThan(0);

    // IOASIDs by set and state, references by holder role: what the core itself lists.
    const listed = (await stack.clients.core.listIoasids({ setId: 0 })).ioasids;
    const sets = (await stack.clients.core.listSets({})).sets;
    expect(total(after.core, "ioasid_sets")).toBe(sets.length);
    for (const set of sets) {
      const mine = listed.filter((i) => i.setId === set.setId);
      const freePending = mine.filter((i) => i.state === coreProto.IoasidState.IOASID_STATE_FREE_PENDING).length;
      expect(total(after.core, "ioasid_ioasids", { set: String(set.setId), state: "ACTIVE" }), `set ${set.setId}`).toBe(mine.length - freePending);
      expect(total(after.core, "ioasid_ioasids", { set: String(set.setId), state: "FREE_PENDING" }), `set ${set.setId}`).toBe(freePending);
    }
    // The freed IOASID's set holds nothing FREE_PENDING once it was reclaimed.
    expect(total(after.core, "ioasid_ioasids", { set: String(r.setId), state: "FREE_PENDING" })).toBe(0);
    const byRole = new Map<string, number>();
    for (const i of listed) for (const h of i.holders) byRole.set(h.holder!.role, (byRole.get(h.holder!.role) ?? 0) + h.count);
    for (const [role, n] of byRole) expect(total(after.core, "ioasid_references", { role }), role).toBe(n);
    expect(total(after.core, "ioasid_references")).toBe([...byRole.values()].reduce((a, b) => a + b, 0));

    // gRPC calls by method and code, at the core and at VFIO (the VMM's FreePasid).
    const coreService = "ioasid.core.v1.CoreService";
    expect(core("ioasid_grpc_server_handled_total", { grpc_service: coreService, grpc_method: "Free", grpc_code: "OK" })).toBeGreaterThanOrEqual(1);
    expect(core("ioasid_grpc_server_handled_total", { grpc_service: coreService, grpc_method: "Describe", grpc_code: "INVALID_ARGUMENT" })).toBe(1);
    expect(core("ioasid_grpc_server_handled_total", { grpc_service: coreService, grpc_method: "AttachSpid", grpc_code: "PERMISSION_DENIED" })).toBe(1);
    expect(grew(before.vfio, after.vfio, "ioasid_grpc_server_handled_total", { grpc_method: "FreePasid", grpc_code: "OK" })).toBeGreaterThanOrEqual(1);

    // Each role handled the FREE (settled: its context cleared, DESIGN §4.3) and kept its tables.
    for (const role of ["kvm", "vdcm", "iommu"] as const) {
      expect(grew(before[role], after[role], "ioasid_role_deliveries_handled_total", { type: "FREE", outcome: "settled" }), role).toBeGreaterThanOrEqual(1);
      expect(grew(before[role], after[role], "ioasid_role_deliveries_handled_total", { outcome: "failed" }), role).toBe(0);
      expect(grew(before[role], after[role], "ioasid_role_state_write_seconds_count", { outcome: "ok" }), role).toBeGreaterThan(0);
    }
  }, 60_000);

  it("the README's metric table and the observability console name exactly the metrics the services declare", async () => {
    const declared = new Set<string>();
    for (const s of SERVICES) {
      const text = await (await fetch(urlOf(s))).text();
      for (const m of text.matchAll(/^# TYPE (ioasid_\w+) /gm)) declared.add(m[1]!);
    }
    const namesIn = (text: string) => new Set([...text.matchAll(/\bioasid_[a-z_]*[a-z]/g)].map((m) => m[0].replace(/_(bucket|count|sum)$/, "")));
    const readme = readFileSync(new URL("../../README.md", import.meta.url), "utf8");
    const section = readme.slice(readme.indexOf("\n### Metrics\n"), readme.indexOf("\n## ", readme.indexOf("\n### Metrics\n")));
    const table = namesIn(
      section
        .split("\n")
        .filter((l) => l.startsWith("| `"))
        .join("\n"),
    );
    const console = namesIn(readFileSync(new URL("../../deploy/prometheus/ioasid.html", import.meta.url), "utf8"));
    expect([...table].sort()).toEqual([...declared].sort());
    expect([...console].filter((n) => !declared.has(n))).toEqual([]);
  });
});

#!/usr/bin/env node
// npm run demo: starts a nats-server (JetStream in a temp dir) and ioasid-core as processes on
// ephemeral ports, walks through the IOASID rules of the kernel document over gRPC, prints the
// committed events, and stops both.
// (The full stack with the four roles and the two life-cycle tables comes with ioasidctl.)
import { fileURLToPath } from "node:url";
import { core, events } from "@ioasid/proto";
import { createClient } from "@ioasid/grpc-kit";
import { startNats, startService } from "@ioasid/testkit";

const out = (s = "") => process.stdout.write(`${s}\n`);
const entry = fileURLToPath(new URL("../services/ioasid-core/dist/main.js", import.meta.url));
const nats = await startNats();
const proc = await startService({ name: "ioasid-core", entry, env: { IOASID_CORE_GRPC_ADDRESS: "127.0.0.1:0", NATS_URL: nats.url } });
const c = createClient(core.CoreServiceService, proc.address);
const MM = events.TokenType.TOKEN_TYPE_MM;
const P = (m, x) => m.fromPartial(x);
let failed = false;
try {
  out(`nats-server on ${nats.url} (JetStream in ${nats.storeDir})`);
  out(`ioasid-core listening on ${proc.address} (pid ${proc.pid}), operation log in JetStream\n`);
  out("1. Two VMs both use guest PASID 101 (SPID), mapped to different host IOASIDs:");
  const vm1 = (await c.createSet(P(core.CreateSetRequest, { tokenType: MM, token: 0x1000n, quota: 64 }))).set.setId;
  const vm2 = (await c.createSet(P(core.CreateSetRequest, { tokenType: MM, token: 0x2000n, quota: 64 }))).set.setId;
  const h1 = await c.alloc(P(core.AllocRequest, { setId: vm1, min: 201 }));
  const h2 = await c.alloc(P(core.AllocRequest, { setId: vm2, min: 201 }));
  await c.attachSpid(P(core.AttachSpidRequest, { setId: vm1, ioasid: h1.ioasid, spid: 101 }));
  await c.attachSpid(P(core.AttachSpidRequest, { setId: vm2, ioasid: h2.ioasid, spid: 101 }));
  for (const [name, set] of [["VM 1", vm1], ["VM 2", vm2]]) {
    const r = await c.findBySpid(P(core.FindBySpidRequest, { setId: set, spid: 101 }));
    out(`   ${name} (set ${set}): guest PASID 101 -> host IOASID ${r.ioasid}`);
  }

  out("\n2. Free before the last put (a misbehaving guest): FREE_PENDING, no new reference, reclaim at the last put:");
  const kvm = { role: "kvm", instance: "vm-1", purpose: "vmcs" };
  const vdcm = { role: "vdcm", instance: "idxd0", purpose: "wq0" };
  await c.get(P(core.GetRequest, { setId: vm1, ioasid: h1.ioasid, holder: kvm }));
  const f = await c.free(P(core.FreeRequest, { setId: vm1, ioasid: h1.ioasid }));
  out(`   free -> ${core.freeOutcomeToJSON(f.outcome)}, refcount ${f.refcount}`);
  const again = await c.free(P(core.FreeRequest, { setId: vm1, ioasid: h1.ioasid }));
  out(`   free again -> ${core.freeOutcomeToJSON(again.outcome)} (no second FREE event)`);
  try {
    await c.get(P(core.GetRequest, { setId: vm1, ioasid: h1.ioasid, holder: vdcm }));
    out("   get after free -> accepted (WRONG)");
    failed = true;
  } catch (err) {
    out(`   get after free -> refused: ${err.reason}`);
  }
  const put = await c.put(P(core.PutRequest, { setId: vm1, ioasid: h1.ioasid, holder: kvm }));
  out(`   put by kvm -> refcount ${put.refcount}, reclaimed ${put.reclaimed}`);

  out("\n3. Another VM cannot touch it:");
  try {
    await c.free(P(core.FreeRequest, { setId: vm1, ioasid: h2.ioasid }));
    out("   VM 1 freeing VM 2's IOASID -> accepted (WRONG)");
    failed = true;
  } catch (err) {
    out(`   VM 1 freeing VM 2's IOASID ${h2.ioasid} -> refused: ${err.reason}`);
  }

  out("\nCommitted events:");
  out("   seq  event       ioasid  gen  spid  set  refcount");
  const last = (await c.getStats({})).lastSeq;
  for await (const { event: e } of c.watchEvents({ fromSeq: 1n })) {
    const id = e.ioasid === 0xffffffff ? "-" : String(e.ioasid);
    out(`   ${String(e.seq).padStart(3)}  ${events.eventTypeToJSON(e.type).replace("EVENT_TYPE_", "").padEnd(10)}  ${id.padStart(6)}  ${String(e.generation).padStart(3)}  ${String(e.spid).padStart(4)}  ${String(e.setId).padStart(3)}  ${String(e.refcount).padStart(8)}`);
    if (e.seq >= last) break;
  }
  out(failed ? "\nverdict: a rule was broken" : "\nverdict: every rule held");
} finally {
  c.close();
  await proc.stop();
  await nats.stop();
}
process.exit(failed ? 1 : 0);

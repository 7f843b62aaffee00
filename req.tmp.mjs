import { connect, createInbox } from "@nats-io/transport-node";
const nc = await connect({ servers: "127.0.0.1:14222" });
const rc = await connect({ servers: "127.0.0.1:14222" });
rc.subscribe("echo", { callback: (e, m) => m.respond(m.data) });
await rc.flush();
const data = new Uint8Array(200);
const inbox = createInbox(); const waiting = new Map(); let tok = 0;
nc.subscribe(`${inbox}.*`, { callback: (e, m) => { const t = m.subject.slice(inbox.length + 1); const w = waiting.get(t); waiting.delete(t); clearTimeout(w.timer); w.resolve(m); } });
const viaInbox = () => new Promise((resolve) => { const t = String(++tok); waiting.set(t, { resolve, timer: setTimeout(() => {}, 5000) }); nc.publish("echo", data, { reply: `${inbox}.${t}` }); });
const viaReq = () => nc.request("echo", data, { timeout: 5000 });
// deep async stack to mimic the engine
async function deep(n, f) { return n === 0 ? f() : await deep(n - 1, f); }
for (const [name, f] of [["request", viaReq], ["inbox", viaInbox], ["request", viaReq], ["inbox", viaInbox]]) {
  const N = 20000; const c0 = process.cpuUsage(); const t0 = performance.now();
  for (let i = 0; i < N; i += 50) await Promise.all(Array.from({ length: 50 }, () => deep(8, f)));
  const c = process.cpuUsage(c0); console.log(name, "µs CPU/request (this process)", ((c.user + c.system) / N).toFixed(1), "wall µs", ((performance.now() - t0) * 1000 / N).toFixed(1));
}
await nc.close(); await rc.close();

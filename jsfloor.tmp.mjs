import { connect, headers as natsHeaders, createInbox } from "@nats-io/transport-node";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
const nc = await connect({ servers: "127.0.0.1:14222" });
const jsm = await jetstreamManager(nc); const js = jetstream(nc);
await jsm.streams.add({ name: "A", subjects: ["a.>"], storage: "file" });
await jsm.streams.add({ name: "B", subjects: ["b.>"], storage: "file", max_msgs_per_subject: 1, discard: "old", retention: "limits" });
const now = () => performance.now();
const p50 = (xs) => { xs.sort((a, b) => a - b); return (xs[xs.length >> 1] * 1000).toFixed(0); };
const data = new Uint8Array(60);
const inbox = createInbox();
const waiting = new Map(); let tok = 0;
nc.subscribe(`${inbox}.*`, { callback: (e, m) => { const t = m.subject.slice(inbox.length + 1); const w = waiting.get(t); waiting.delete(t); w(); } });
const raw = (subj, h) => new Promise((res) => { const t = String(++tok); waiting.set(t, res); nc.publish(subj, data, { headers: h, reply: `${inbox}.${t}` }); });
const hdr = () => { const h = natsHeaders(); h.set("Ioasid-Format", "iommu.v1"); h.set("Ioasid-Key", "gp/30/200000"); return h; };
const cases = {
  "A js.publish same subj": () => js.publish("a.x", data),
  "B js.publish maxPerSubj=1, hdrs": () => js.publish("b.x", data, { headers: hdr() }),
  "B raw inbox, hdrs": () => raw("b.x", hdr()),
  "A raw inbox, hdrs": () => raw("a.x", hdr()),
  "B setImmediate+raw": () => new Promise((r) => setImmediate(r)).then(() => raw("b.x", hdr())),
  "B setImmediate+js": () => new Promise((r) => setImmediate(r)).then(() => js.publish("b.x", data, { headers: hdr() })),
};
const res = Object.fromEntries(Object.keys(cases).map((k) => [k, []]));
for (let round = 0; round < 10; round++) for (const [k, f] of Object.entries(cases)) for (let i = 0; i < 300; i++) { const t = now(); await f(); res[k].push(now() - t); }
for (const [k, xs] of Object.entries(res)) console.log(k.padEnd(34), p50(xs), "µs");
const cpu = process.cpuUsage(); console.log("cpu", cpu);
await nc.close();

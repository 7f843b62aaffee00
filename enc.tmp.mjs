import { HistoryRecorder } from "@ioasid/bus";
const fakeNc = { isClosed: () => false, subscribe() {}, publish() {}, options: {} };
const r = new HistoryRecorder(fakeNc, "ioasid-core", "0");
const N = 200000;
let t = performance.now();
for (let i = 0; i < N; i++) r.recordIn(`g:${i}`, { "Ioasid-Op-Log": "x", "Ioasid-Op-Seq": String(i) }, { $case: "ioasidPut", value: { holder: { role: "vfio", instance: "0", purpose: "bind" } } }, { ioasid: i, generation: 1, setId: 3, refcount: 2, seq: i, opSeq: i }, Date.now());
let t2 = performance.now();
console.log("recordIn µs/record", ((t2 - t) * 1000 / N).toFixed(2));
r.flush(); console.log("flush µs/record", ((performance.now() - t2) * 1000 / N).toFixed(2));

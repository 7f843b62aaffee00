import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connect, headers as natsHeaders, type Msg, type NatsConnection } from "@nats-io/transport-node";
import {
  checkExample,
  DEFAULT_PREFIX,
  deliverySubject,
  exampleMessage,
  formatFailures,
  helloSubject,
  parseMessageContract,
  readMessageContract,
  startSubscriber,
  verifyInteraction,
  verifyMessage,
  type CapturedMessage,
  type ContractFailure,
  type EventHandler,
  type MessageContract,
  type MessageInteraction,
  type Subscriber,
} from "@ioasid/bus";
import { bus, core, events } from "@ioasid/proto";
import { startNats, waitFor, type NatsServer } from "@ioasid/testkit";
import { KvmEventType, toKvmEvent } from "@ioasid/kvm";
import { toVdcmEvent } from "@ioasid/vdcm";
import { toIommuEvent } from "@ioasid/iommu";
import { startCore, type CoreFixture } from "../support/core-fixture.js";
import { deliveriesSettled, exists } from "../support/delivery-fixture.js";

// The bus's message contracts (contracts/messages/, DESIGN §12), verified from both sides against
// the real components on a real nats-server:
// - provider side: the real core (its DeliveryEngine) and the real subscriber SDK are driven
//   through each `given` state, a plain subscription captures what they send (deliveries with
//   their headers, the acks answering them, hellos and their replies), and every interaction of
//   every consumer's contract is checked against those messages;
// - consumer side: each contract's examples are fed to the real consumer (the SDK with the role's
//   own event adapter; the core's delivery engine and hello handler) and must be accepted.

const CONTRACTS = fileURLToPath(new URL("../../contracts/messages/", import.meta.url));
const FILES = readdirSync(CONTRACTS)
  .filter((f) => f.endsWith(".json"))
  .sort();
const contracts = new Map<string, MessageContract>(FILES.map((f) => [f, readMessageContract(join(CONTRACTS, f))]));
/** The contracts of one channel (`<consumer>--<provider>.<channel>.json`). */
const ofChannel = (channel: string) => [...contracts].filter(([f]) => f.endsWith(`.${channel}.json`));
const contract = (file: string): MessageContract => contracts.get(file) ?? expect.fail(`no contract ${file}`);

const { Priority, TokenType, EventType } = events;
const SETTLED = bus.AckStatus.ACK_STATUS_SETTLED;
const P = <T>(m: { fromPartial(x: object): T }, x: object): T => m.fromPartial(x);

// Provider states: the `given` of each interaction, and what the test does to bring it about.
/** DeliveryBatch (provider: the core): the step of the story below. */
const DELIVERY_STATES: Record<string, Step> = {
  "an SPID is attached to an IOASID of the subscriber's set": "bind",
  "the SPID is detached from the IOASID while it is ACTIVE": "unbind",
  "an IOASID the subscriber holds a reference on is freed": "free",
};
type Step = "setup" | "bind" | "unbind" | "free";
/** AckBatch (provider: the SDK): what the handler did with the deliveries the ack answers. */
const ACK_STATES: Record<string, AckKind> = {
  "the handler settles and returns references to release": "releases",
  "the handler settles and asks for the SPID to be detached": "detaches",
  "the handler settles with nothing to release": "nothing",
  "the handler throws": "throws",
};
type AckKind = "releases" | "detaches" | "nothing" | "throws";
const HELLO_STATE = "a subscriber starts";
const HELLO_REPLY_STATE = "a subscriber says hello";

function stateOf<T>(states: Record<string, T>, i: MessageInteraction): T {
  return states[i.given] ?? expect.fail(`the test knows no provider state "${i.given}" (interaction "${i.description}"): add it here`);
}

function headersOf(msg: Msg): Record<string, string> {
  const out: Record<string, string> = {};
  for (const k of msg.headers?.keys() ?? []) out[k] = msg.headers!.get(k);
  return out;
}

/** Everything sent on the bus's subjects, seen by a plain subscription (no queue group: a copy). */
class Capture {
  readonly requests: Array<{
    readonly step: Step;
    readonly subject: string;
    readonly reply: string;
    readonly headers: Record<string, string>;
    readonly data: Uint8Array;
  }> = [];
  readonly replies = new Map<string, Uint8Array>();
  step: Step = "setup";

  constructor(readonly nc: NatsConnection) {
    for (const subject of [`${DEFAULT_PREFIX}.deliver.>`, helloSubject(DEFAULT_PREFIX)]) {
      nc.subscribe(subject, {
        callback: (err, msg) => {
          if (err === null) this.requests.push({ step: this.step, subject: msg.subject, reply: msg.reply ?? "", headers: headersOf(msg), data: msg.data });
        },
      });
    }
    nc.subscribe("_INBOX.>", {
      callback: (err, msg) => {
        if (err === null) this.replies.set(msg.subject, msg.data);
      },
    });
  }

  /** Requests on subjects starting with `start`, in a step (or any). */
  sent(start: string, step?: Step): CapturedMessage[] {
    return this.requests.filter((r) => r.subject.startsWith(start) && (step === undefined || r.step === step));
  }

  /** The replies to the requests on subjects starting with `start`, each with its request. */
  answers(start: string): CapturedMessage[] {
    return this.requests
      .filter((r) => r.subject.startsWith(start) && this.replies.has(r.reply))
      .map((r) => ({ subject: r.reply, headers: {}, data: this.replies.get(r.reply)!, request: { subject: r.subject, data: r.data } }));
  }
}

describe("the checked-in message contracts", () => {
  it("are named <consumer>--<provider>.<channel>.json and cover every bus message both ways", () => {
    for (const [file, c] of contracts) expect(file).toMatch(new RegExp(`^${c.consumer}--${c.provider}\\.[a-z-]+\\.json$`));
    const types = new Set([...contracts.values()].flatMap((c) => c.interactions.map((i) => i.messageType)));
    expect([...types].sort()).toEqual(["ioasid.bus.v1.AckBatch", "ioasid.bus.v1.DeliveryBatch", "ioasid.bus.v1.Hello", "ioasid.bus.v1.HelloReply"]);
    expect(ofChannel("delivery").map(([, c]) => c.consumer)).toEqual(["iommu", "kvm", "vdcm"]);
  });

  it.each(FILES)("%s: every example is canonical, shows what is relied on, and meets its own interaction", (file) => {
    expect(formatFailures(contract(file).interactions.flatMap((i) => checkExample(i)))).toBe("");
  });
});

describe("provider side: what the real core and the real subscriber SDK send", () => {
  let fixture: CoreFixture;
  let capNc: NatsConnection;
  let rolesNc: NatsConnection;
  let capture: Capture;
  const subscribers: Subscriber[] = [];
  /** What each handler did, by `<delivery subject>|<seq>|<attempt>`. */
  const did = new Map<string, AckKind>();

  /** A role's handler as the SDK runs it, recording what it did for the ack states. */
  function role(name: string, instance: string, act: (e: events.IoasidEvent, attempt: number) => AckKind): Promise<Subscriber> {
    const subject = deliverySubject(DEFAULT_PREFIX, name, instance);
    const handler: EventHandler = (e, ctx) => {
      const kind = act(e, ctx.attempt);
      did.set(`${subject}|${e.seq}|${ctx.attempt}`, kind);
      if (kind === "throws") throw new Error(`${name}: injected failure of seq ${e.seq}`);
      if (kind === "releases") return { release: [name === "kvm" ? "vmcs" : "dsa0.wq0"] };
      if (kind === "detaches") return { release: ["bind"], detachSpid: true };
      return undefined;
    };
    return startSubscriber({ nc: rolesNc, name, instance, handler });
  }

  beforeAll(async () => {
    // Each core has a nats-server of its own: a core recovers whatever its stream holds.
    fixture = await startCore({ IOASID_DELIVERY_RETRY: "100ms" });
    const c = fixture.client;
    capNc = await connect({ servers: fixture.nats.url, name: "capture" });
    capture = new Capture(capNc);
    await capNc.flush();
    rolesNc = await connect({ servers: fixture.nats.url, name: "roles" });
    /**
     * Every delivery acknowledged, and every copy of it and its reply captured (a flush orders
     * them). A provider that breaks the protocol leaves deliveries unacknowledged: then the error
     * says which clauses of the contracts what was captured so far breaks.
     */
    const settle = async (wait: () => Promise<void> = () => deliveriesSettled(c, { timeoutMs: 10_000 })) => {
      try {
        await wait();
      } catch (err) {
        await capNc.flush();
        const failures = [...ofChannel("delivery").flatMap(([f]) => deliveryFailures(f)), ...ackFailures(), ...helloFailures()];
        throw new Error(`${(err as Error).message}; what was captured so far, against the contracts:\n${formatFailures(failures)}`, { cause: err });
      }
      await capNc.flush();
    };

    // The registrations the roles make (services/*/src: KVM by MM token at CPU for BIND/UNBIND/FREE,
    // VDCM on the set at DEVICE for FREE, the IOMMU globally at IOMMU for FREE).
    const token = 0x7001n;
    const reg = (name: string, instance: string, priority: events.Priority, scope: object, evs: events.EventType[]) =>
      c.register(P(core.RegisterRequest, { subscriber: { name, instance }, priority, scope, events: evs }));
    await reg("kvm", "vm-1", Priority.PRIORITY_CPU, { $case: "mmToken", value: token }, [
      EventType.EVENT_TYPE_BIND,
      EventType.EVENT_TYPE_UNBIND,
      EventType.EVENT_TYPE_FREE,
    ]);
    const setId = (await c.createSet(P(core.CreateSetRequest, { tokenType: TokenType.TOKEN_TYPE_MM, token, quota: 8 }))).set!.setId;
    await reg("vdcm", "vdcm0", Priority.PRIORITY_DEVICE, { $case: "setId", value: setId }, [EventType.EVENT_TYPE_FREE]);
    await reg("iommu", "dmar0", Priority.PRIORITY_IOMMU, { $case: "global", value: true }, [EventType.EVENT_TYPE_FREE]);
    const type = (e: events.IoasidEvent) => toKvmEvent(e).type;
    subscribers.push(
      // KVM's UNBIND handler fails once: the FAILED ack, then the redelivery (attempt 2).
      await role("kvm", "vm-1", (e, attempt) =>
        type(e) === KvmEventType.FREE ? "releases" : type(e) === KvmEventType.UNBIND && attempt === 1 ? "throws" : "nothing",
      ),
      await role("vdcm", "vdcm0", () => "releases"),
      await role("iommu", "dmar0", () => "detaches"),
    );

    const { ioasid } = await c.alloc(P(core.AllocRequest, { setId }));
    for (const [r, instance, purpose] of [
      ["kvm", "vm-1", "vmcs"],
      ["vdcm", "vdcm0", "dsa0.wq0"],
      ["iommu", "dmar0", "bind"],
    ] as const) {
      await c.get(P(core.GetRequest, { setId, ioasid, holder: { role: r, instance, purpose } }));
    }
    await settle();
    capture.step = "bind";
    await c.attachSpid(P(core.AttachSpidRequest, { setId, ioasid, spid: 5 }));
    await settle();
    capture.step = "unbind";
    await c.detachSpid(P(core.DetachSpidRequest, { setId, ioasid }));
    await settle();
    capture.step = "bind";
    await c.attachSpid(P(core.AttachSpidRequest, { setId, ioasid, spid: 6 }));
    await settle();
    capture.step = "free";
    await c.free(P(core.FreeRequest, { setId, ioasid }));
    // CPU → DEVICE → IOMMU; the IOMMU's ack drops the last reference.
    await settle(() => waitFor(async () => !(await exists(c, ioasid)), { timeoutMs: 10_000, message: "the IOASID reclaimed with the IOMMU's ack" }));
    await settle();
  });

  afterAll(async () => {
    for (const s of subscribers) await s.stop();
    await rolesNc?.drain();
    await capNc?.drain();
    if (fixture !== undefined) expect(await fixture.stop()).toBe(0);
  });

  /** Every interaction of a DeliveryBatch contract against the deliveries captured in its `given` step. */
  const deliveryFailures = (file: string): ContractFailure[] =>
    contract(file).interactions.flatMap((i) => verifyInteraction(i, capture.sent(`${DEFAULT_PREFIX}.deliver.`, stateOf(DELIVERY_STATES, i))));
  /** What the handler did for every delivery an ack answers, when it did the same for all. */
  const kindOf = (m: CapturedMessage): AckKind | undefined => {
    const kinds = new Set(bus.DeliveryBatch.decode(m.request!.data).deliveries.map((d) => did.get(`${m.request!.subject}|${d.event!.seq}|${d.attempt}`)));
    return kinds.size === 1 ? [...kinds][0] : undefined;
  };
  /** Every interaction of the ack contract against the acks answering deliveries its `given` handler handled. */
  const ackFailures = (): ContractFailure[] => {
    const acks = capture.answers(`${DEFAULT_PREFIX}.deliver.`);
    return contract("core--subscriber.ack.json").interactions.flatMap((i) =>
      verifyInteraction(
        i,
        acks.filter((m) => kindOf(m) === stateOf(ACK_STATES, i)),
      ),
    );
  };
  /** The hellos the SDK sent as it started, and the core's replies to them. */
  const helloFailures = (): ContractFailure[] => {
    const hello = contract("core--subscriber.hello.json").interactions;
    const reply = contract("subscriber--core.hello-reply.json").interactions;
    for (const i of hello) stateOf({ [HELLO_STATE]: true }, i);
    for (const i of reply) stateOf({ [HELLO_REPLY_STATE]: true }, i);
    return [
      ...hello.flatMap((i) => verifyInteraction(i, capture.sent(helloSubject(DEFAULT_PREFIX)))),
      ...reply.flatMap((i) => verifyInteraction(i, capture.answers(helloSubject(DEFAULT_PREFIX)))),
    ];
  };

  it.each(ofChannel("delivery").map(([f]) => f))("the core's DeliveryBatches (with their headers) meet %s", (file) => {
    expect(formatFailures(deliveryFailures(file))).toBe("");
  });

  it("the SDK's AckBatches meet core--subscriber.ack.json, each against the delivery it answers", () => {
    expect(formatFailures(ackFailures())).toBe("");
    // Every kind of answer was exercised (a FAILED one included: KVM's first UNBIND).
    expect(new Set(capture.answers(`${DEFAULT_PREFIX}.deliver.`).map(kindOf))).toEqual(new Set<AckKind>(["releases", "detaches", "nothing", "throws"]));
  });

  it("the SDK's Hellos meet core--subscriber.hello.json, and the core's HelloReplies subscriber--core.hello-reply.json", () => {
    expect(capture.sent(helloSubject(DEFAULT_PREFIX))).toHaveLength(3); // one per subscriber as it started
    expect(formatFailures(helloFailures())).toBe("");
  });

  it("fails a contract the provider does not meet, naming the path, what was expected and what came", () => {
    // KVM's contract as a careless consumer might write it: FREE read as UNBIND, a batch of two.
    const raw = JSON.parse(readFileSync(join(CONTRACTS, "kvm--core.delivery.json"), "utf8")) as {
      interactions: Array<{ given: string; matchers: Record<string, { oneOf?: string[] }>; headers: Record<string, object> }>;
    };
    const free = raw.interactions.find((i) => DELIVERY_STATES[i.given] === "free")!;
    free.matchers["deliveries[*].event.type"]!.oneOf = ["EVENT_TYPE_UNBIND"];
    free.headers["Ioasid-Count"] = { pattern: "^2$" };
    const wrong = parseMessageContract(raw, "kvm--core.delivery.json, altered").interactions.find((i) => i.given === free.given)!;
    const failures = verifyInteraction(wrong, capture.sent(`${DEFAULT_PREFIX}.deliver.`, "free"));
    expect(failures).toContainEqual({
      interaction: wrong.description,
      path: "deliveries[0].event.type",
      expected: "one of EVENT_TYPE_UNBIND",
      got: '"EVENT_TYPE_FREE"',
    });
    expect(failures).toContainEqual({ interaction: wrong.description, path: "header Ioasid-Count", expected: "text matching /^2$/", got: '"1"' });
    expect(formatFailures(failures)).toMatch(/: deliveries\[0\]\.event\.type: expected one of EVENT_TYPE_UNBIND, got "EVENT_TYPE_FREE"/);
  });
});

describe("consumer side: the roles' consumers (SDK + the role's event adapter) accept their contracts' examples", () => {
  // A prefix of its own: no core answers here, the examples are all there is.
  const PREFIX = "contract.v1";
  let nats: NatsServer;
  let nc: NatsConnection;
  beforeAll(async () => {
    nats = await startNats();
    nc = await connect({ servers: nats.url, name: "consumers" });
  });
  afterAll(async () => {
    await nc?.drain();
    await nats?.stop();
  });

  interface EventJson {
    readonly seq: string;
    readonly type: string;
    readonly ioasid?: number;
    readonly generation?: number;
    readonly spid?: number;
    readonly setId?: number;
  }
  /** Each role's own reading of a delivered event, and what it should read from the example (taken from the JSON, not the codec). */
  const ADAPTERS: Record<string, { read: (e: events.IoasidEvent) => unknown; expected: (e: EventJson) => unknown }> = {
    kvm: {
      read: toKvmEvent,
      expected: (e) => ({
        seq: BigInt(e.seq),
        type: e.type.replace("EVENT_TYPE_", ""),
        ioasid: e.ioasid,
        generation: e.generation,
        spid: e.spid ?? 0,
        setId: e.setId,
      }),
    },
    iommu: {
      read: toIommuEvent,
      expected: (e) => ({
        seq: Number(e.seq),
        type: e.type.replace("EVENT_TYPE_", ""),
        ioasid: e.ioasid,
        generation: e.generation,
        spid: e.spid ?? 0,
        setId: e.setId,
      }),
    },
    vdcm: {
      read: toVdcmEvent,
      expected: (e) => ({
        type: e.type.replace("EVENT_TYPE_", ""),
        seq: Number(e.seq),
        ioasid: e.ioasid,
        generation: e.generation,
        setId: e.setId,
        spid: e.spid ?? 0,
      }),
    },
  };

  const cases = ofChannel("delivery").flatMap(([file, c]) => c.interactions.map((i) => ({ name: `${file}: ${i.description}`, consumer: c.consumer, i })));
  for (const { name: test, consumer, i } of cases) {
    it(test, async () => {
      const adapter = ADAPTERS[consumer] ?? expect.fail(`no adapter for consumer ${consumer}`);
      const ex = exampleMessage(i, { prefix: PREFIX });
      const [deliver, name, instance] = ex.subject.slice(PREFIX.length + 1).split(".");
      expect(deliver).toBe("deliver");
      const seen: unknown[] = [];
      const sub = await startSubscriber({ nc, name: name!, instance: instance!, prefix: PREFIX, handler: (e) => void seen.push(adapter.read(e)) });
      try {
        const h = natsHeaders();
        for (const [k, v] of Object.entries(ex.headers)) h.set(k, v);
        const reply = await nc.request(ex.subject, ex.data, { headers: h, timeout: 5000 });
        const sent = i.example.message["deliveries"] as Array<{ registrationId: number; event: EventJson }>;
        // Accepted: one SETTLED ack per delivery, in order, naming it.
        expect(bus.AckBatch.decode(reply.data).acks.map((a) => ({ seq: a.seq, registrationId: a.registrationId, status: a.status }))).toEqual(
          sent.map((d) => ({ seq: BigInt(d.event.seq), registrationId: d.registrationId, status: SETTLED })),
        );
        // And read as the role means it: the event type it acts on (not KVM's OTHER, not one the IOMMU drops), every field intact.
        expect(seen).toEqual(sent.map((d) => adapter.expected(d.event)));
      } finally {
        await sub.stop();
      }
    });
  }

  it("subscriber--core.hello-reply.json: the SDK's hello() reads the example HelloReply", async () => {
    const [i] = contract("subscriber--core.hello-reply.json").interactions;
    const ex = exampleMessage(i!, { prefix: PREFIX });
    const responder = nc.subscribe(helloSubject(PREFIX), {
      callback: (err, msg) => {
        if (err === null) msg.respond(ex.data);
      },
    });
    let sub: Subscriber | undefined;
    try {
      sub = await startSubscriber({ nc, name: "kvm", instance: "vm-1", prefix: PREFIX, handler: () => undefined });
      expect(await sub.hello()).toBe(i!.example.message["backlog"]);
    } finally {
      await sub?.stop();
      responder.unsubscribe();
    }
  });
});

describe("consumer side: the real core accepts the subscriber's AckBatch and Hello examples", () => {
  // A subscriber that is not the SDK: it answers the core's deliveries with the contract's example
  // AckBatch (seq and registration taken from the delivery it answers, as `sameAs: $request` says).
  const probe = { name: "probe", instance: "p0" } as const;
  let fixture: CoreFixture;
  let nc: NatsConnection;
  let setId: number;
  const inbox: Msg[] = [];

  beforeAll(async () => {
    fixture = await startCore({ IOASID_DELIVERY_RETRY: "100ms" });
    nc = await connect({ servers: fixture.nats.url, name: "probe" });
    nc.subscribe(deliverySubject(DEFAULT_PREFIX, probe.name, probe.instance), {
      callback: (err, msg) => {
        if (err === null) inbox.push(msg);
      },
    });
    await nc.flush();
    const c = fixture.client;
    setId = (await c.createSet(P(core.CreateSetRequest, { tokenType: TokenType.TOKEN_TYPE_NONE, token: 9n, quota: 16 }))).set!.setId;
    await c.register(
      P(core.RegisterRequest, {
        subscriber: probe,
        priority: Priority.PRIORITY_DEVICE,
        scope: { $case: "setId", value: setId },
        events: [EventType.EVENT_TYPE_BIND, EventType.EVENT_TYPE_FREE],
      }),
    );
  });
  afterAll(async () => {
    await nc?.drain();
    if (fixture !== undefined) expect(await fixture.stop()).toBe(0);
  });

  /** The next delivery to the probe, with its one event. */
  async function next(type: events.EventType, ioasid: number): Promise<{ msg: Msg; delivery: bus.Delivery }> {
    await waitFor(() => inbox.length > 0, { timeoutMs: 10_000, message: `a ${events.eventTypeToJSON(type)} delivery to the probe` });
    const msg = inbox.shift()!;
    const [delivery] = bus.DeliveryBatch.decode(msg.data).deliveries;
    expect({ type: delivery?.event?.type, ioasid: delivery?.event?.ioasid }).toEqual({ type, ioasid });
    return { msg, delivery: delivery! };
  }
  const answer = (i: MessageInteraction, msg: Msg) => msg.respond(exampleMessage(i, { request: { subject: msg.subject, headers: {}, data: msg.data } }).data);
  const settleAll = (msg: Msg) =>
    msg.respond(
      bus.AckBatch.encode({
        acks: bus.DeliveryBatch.decode(msg.data).deliveries.map((d) => ({
          seq: d.event!.seq,
          registrationId: d.registrationId,
          status: SETTLED,
          releases: [],
          error: "",
          detachSpid: false,
        })),
      }).finish(),
    );
  const purposesOf = (i: MessageInteraction) =>
    ((i.example.message["acks"] as Array<{ releases?: Array<{ purpose: string }> }>)[0]?.releases ?? []).map((r) => r.purpose);

  /** Brings about a delivery the example can answer, answers it with the example, and checks the core acted on it. */
  const SCENARIOS: Record<AckKind, (i: MessageInteraction) => Promise<void>> = {
    async releases(i) {
      const c = fixture.client;
      const { ioasid } = await c.alloc(P(core.AllocRequest, { setId }));
      for (const purpose of purposesOf(i)) await c.get(P(core.GetRequest, { setId, ioasid, holder: { role: probe.name, instance: probe.instance, purpose } }));
      await c.free(P(core.FreeRequest, { setId, ioasid }));
      answer(i, (await next(EventType.EVENT_TYPE_FREE, ioasid)).msg);
      // The releases were applied: the probe's references were the last ones.
      await waitFor(async () => !(await exists(c, ioasid)), { timeoutMs: 10_000, message: "the IOASID reclaimed by the example's releases" });
      await deliveriesSettled(c);
    },
    async detaches(i) {
      const c = fixture.client;
      const { ioasid } = await c.alloc(P(core.AllocRequest, { setId }));
      const keeper = { role: "keeper", instance: "k0", purpose: "hold" };
      for (const purpose of purposesOf(i)) await c.get(P(core.GetRequest, { setId, ioasid, holder: { role: probe.name, instance: probe.instance, purpose } }));
      await c.get(P(core.GetRequest, { setId, ioasid, holder: keeper }));
      await c.attachSpid(P(core.AttachSpidRequest, { setId, ioasid, spid: 9 }));
      settleAll((await next(EventType.EVENT_TYPE_BIND, ioasid)).msg);
      await c.free(P(core.FreeRequest, { setId, ioasid }));
      answer(i, (await next(EventType.EVENT_TYPE_FREE, ioasid)).msg);
      // The SPID went with the ack, and the probe's references; the keeper's holds it FREE_PENDING.
      await waitFor(
        async () => {
          const info = (await c.describe({ ioasid })).info!;
          return info.spid === 0 && info.holders.every((h) => h.holder?.role !== probe.name);
        },
        { timeoutMs: 10_000, message: "the SPID detached and the references released by the example's ack" },
      );
      expect((await c.describe({ ioasid })).info!.holders.map((h) => h.holder?.role)).toContain("keeper");
      await deliveriesSettled(c);
    },
    async nothing(i) {
      const c = fixture.client;
      const { ioasid } = await c.alloc(P(core.AllocRequest, { setId }));
      await c.attachSpid(P(core.AttachSpidRequest, { setId, ioasid, spid: 10 }));
      answer(i, (await next(EventType.EVENT_TYPE_BIND, ioasid)).msg);
      // Counted as acknowledged: nothing pending, nothing missed.
      await deliveriesSettled(c);
    },
    async throws(i) {
      const c = fixture.client;
      const { ioasid } = await c.alloc(P(core.AllocRequest, { setId }));
      await c.attachSpid(P(core.AttachSpidRequest, { setId, ioasid, spid: 11 }));
      const first = await next(EventType.EVENT_TYPE_BIND, ioasid);
      answer(i, first.msg);
      // Counted as missed, with the example's error as the reason; then redelivered (attempt 2).
      const error = String((i.example.message["acks"] as Array<{ error?: string }>)[0]?.error);
      await waitFor(() => fixture.proc.logs().includes(`handler failed: ${error}`), { timeoutMs: 10_000, message: "the core's log of the failed delivery" });
      const again = await next(EventType.EVENT_TYPE_BIND, ioasid);
      expect({ seq: again.delivery.event!.seq, attempt: again.delivery.attempt }).toEqual({ seq: first.delivery.event!.seq, attempt: 2 });
      settleAll(again.msg);
      await deliveriesSettled(c);
    },
  };

  for (const i of contract("core--subscriber.ack.json").interactions) {
    it(`core--subscriber.ack.json: ${i.description}`, async () => {
      await SCENARIOS[stateOf(ACK_STATES, i)](i);
      expect(inbox).toHaveLength(0);
    });
  }

  it("core--subscriber.hello.json: the core answers the example Hello, and its reply meets the SDK's contract", async () => {
    const [i] = contract("core--subscriber.hello.json").interactions;
    const ex = exampleMessage(i!);
    const reply = await nc.request(ex.subject, ex.data, { timeout: 5000 });
    expect(bus.HelloReply.decode(reply.data)).toEqual({ backlog: 0 });
    const replies = contract("subscriber--core.hello-reply.json").interactions;
    const failures = replies.flatMap((r) =>
      verifyMessage(r, { subject: reply.subject, headers: {}, data: reply.data, request: { subject: ex.subject, data: ex.data } }),
    );
    expect(formatFailures(failures)).toBe("");
  });
});

import { readFileSync } from "node:fs";
import * as proto from "@ioasid/proto";
import { DEFAULT_PREFIX } from "./subjects.js";

// Consumer-driven message contracts for the bus (DESIGN §12: "the bus messages have message
// contracts (consumer-driven) checked from both sides"). A consumer writes down, per interaction,
// which fields of a message it relies on; a captured message of the provider is decoded with the
// generated codecs, turned into proto3 JSON (lowerCamelCase names, enum names, uint64 as strings,
// defaults left out) and checked against those matchers. The format is described in
// contracts/messages/README.md; Pact is not used (its Node package downloads a native binary at
// install, and it matches JSON bodies, not protobuf).

/** Format tag every contract file carries. */
export const MESSAGE_CONTRACT_FORMAT = "ioasid-message-contract/1";

/** What a matcher says the value is. uint64 is a decimal string, as proto3 JSON writes it (and as headers are). */
export const MATCHER_TYPES = ["uint32", "uint64", "string", "bool", "enum", "bytes", "timestamp"] as const;
export type MatcherType = (typeof MATCHER_TYPES)[number];

/** What a consumer relies on about one field (or header); every given rule must hold. */
export interface Matcher {
  readonly type?: MatcherType;
  /** The value is one of these (enum names, strings, numbers, booleans; compared as text). */
  readonly oneOf?: ReadonlyArray<string | number | boolean>;
  /** Integer bounds (uint32, uint64 and numeric headers), inclusive. */
  readonly min?: number | string;
  readonly max?: number | string;
  /** A string (or bytes) that is not empty. */
  readonly nonEmpty?: boolean;
  /** A regular expression the text matches. */
  readonly pattern?: string;
  /** Bounds on the length of a list (an absent list is empty: proto3 JSON leaves it out). */
  readonly minItems?: number;
  readonly maxItems?: number;
  /** Equal to the value at another path of the message, or `$request.<path>` of the request a reply answers; `[*]` aligns with this path's. */
  readonly sameAs?: string;
  /** Equal to the number of elements of the list at that path (same `$request.` rule). */
  readonly countOf?: string;
  /** Why the consumer relies on it (the code that reads it); not checked. */
  readonly because?: string;
}

/** A message the consumer accepts, as the provider would send it. */
export interface MessageExample {
  /** The subject it is sent on, or for a reply the subject of the request it answers; `<prefix>` stands for the bus prefix. */
  readonly subject: string;
  readonly headers?: Readonly<Record<string, string>>;
  /** The message as proto3 JSON. */
  readonly message: Record<string, unknown>;
  /** For a reply: the request it answers, as proto3 JSON. */
  readonly request?: Record<string, unknown>;
}

/** One kind of message the consumer receives from the provider. */
export interface MessageInteraction {
  readonly description: string;
  /** The provider state that produces it (the verifying test knows how to bring it about). */
  readonly given: string;
  /** Fully qualified proto name, e.g. `ioasid.bus.v1.DeliveryBatch`. */
  readonly messageType: string;
  /** Subject pattern: `<prefix>` is the bus prefix, any other `<name>` one token. Absent for a reply. */
  readonly subject?: string;
  /** For a reply: the subject pattern of the request it answers, and the request's type. */
  readonly replyTo?: string;
  readonly requestType?: string;
  readonly headers?: Readonly<Record<string, Matcher>>;
  /** Path (`deliveries[*].event.type`, `[n]`, `[-1]`) → matcher, on the message as proto3 JSON. */
  readonly matchers: Readonly<Record<string, Matcher>>;
  readonly example: MessageExample;
}

/** The contract of one consumer with one provider. */
export interface MessageContract {
  readonly format: typeof MESSAGE_CONTRACT_FORMAT;
  readonly consumer: string;
  readonly provider: string;
  readonly description: string;
  readonly interactions: readonly MessageInteraction[];
}

/** A message as it went over the bus (captured by a plain subscription). */
export interface CapturedMessage {
  readonly subject: string;
  readonly headers: Readonly<Record<string, string>>;
  readonly data: Uint8Array;
  /** For a reply: the request it answers. */
  readonly request?: { readonly subject: string; readonly data: Uint8Array };
}

/** One way a message falls short of an interaction: where, what the consumer expects, what came. */
export interface ContractFailure {
  readonly interaction: string;
  readonly path: string;
  readonly expected: string;
  readonly got: string;
}

/** Options of the verifying functions. */
export interface VerifyOptions {
  /** @default "ioasid.v1" */
  readonly prefix?: string;
}

interface JsonCodec {
  decode(input: Uint8Array): unknown;
  encode(message: never): { finish(): Uint8Array };
  fromJSON(object: unknown): unknown;
  toJSON(message: never): unknown;
}

/**
 * The generated codec of a top-level message by its fully qualified name, found among the
 * @ioasid/proto namespaces by their `protobufPackage`.
 * @throws Error for a name no namespace has
 */
export function messageCodec(fullName: string): JsonCodec {
  const dot = fullName.lastIndexOf(".");
  const pkg = fullName.slice(0, dot);
  const name = fullName.slice(dot + 1);
  for (const ns of Object.values(proto) as unknown[]) {
    if (!isObject(ns) || ns["protobufPackage"] !== pkg) continue;
    const fns = ns[name];
    if (isObject(fns) && typeof fns["decode"] === "function" && typeof fns["toJSON"] === "function") return fns as unknown as JsonCodec;
  }
  throw new Error(`unknown message type ${fullName}: no such message in @ioasid/proto`);
}

const MATCHER_KEYS = new Set(["type", "oneOf", "min", "max", "nonEmpty", "pattern", "minItems", "maxItems", "sameAs", "countOf", "because"]);
const INTERACTION_KEYS = new Set(["description", "given", "messageType", "subject", "replyTo", "requestType", "headers", "matchers", "example"]);

/**
 * Checks the shape of a parsed contract file: required fields, known keys only (a misspelt matcher
 * must not pass silently), parseable paths and patterns, known message types.
 * @throws Error listing every problem, prefixed with `source`
 */
export function parseMessageContract(value: unknown, source = "message contract"): MessageContract {
  const problems: string[] = [];
  const need = (ok: boolean, what: string) => {
    if (!ok) problems.push(what);
  };
  if (!isObject(value)) throw new Error(`${source}: not a JSON object`);
  need(value["format"] === MESSAGE_CONTRACT_FORMAT, `format must be "${MESSAGE_CONTRACT_FORMAT}"`);
  for (const k of ["consumer", "provider", "description"]) need(typeof value[k] === "string" && value[k] !== "", `${k} must be a non-empty string`);
  const interactions = value["interactions"];
  need(Array.isArray(interactions) && interactions.length > 0, "interactions must be a non-empty list");
  (Array.isArray(interactions) ? interactions : []).forEach((i: unknown, n) => {
    const at = `interactions[${n}]`;
    if (!isObject(i)) return problems.push(`${at} must be an object`);
    for (const k of Object.keys(i)) need(INTERACTION_KEYS.has(k), `${at}: unknown key "${k}"`);
    for (const k of ["description", "given", "messageType"]) need(typeof i[k] === "string" && i[k] !== "", `${at}.${k} must be a non-empty string`);
    need((typeof i["subject"] === "string") !== (typeof i["replyTo"] === "string"), `${at} needs exactly one of subject and replyTo`);
    need((typeof i["replyTo"] === "string") === (typeof i["requestType"] === "string"), `${at}: replyTo and requestType go together`);
    for (const k of ["messageType", "requestType"]) {
      if (typeof i[k] !== "string") continue;
      try {
        messageCodec(i[k]);
      } catch (err) {
        problems.push(`${at}.${k}: ${(err as Error).message}`);
      }
    }
    const matcherSets: Array<[string, unknown]> = [
      ["matchers", i["matchers"]],
      ["headers", i["headers"] ?? {}],
    ];
    need(isObject(i["matchers"]) && Object.keys(i["matchers"]).length > 0, `${at}.matchers must name at least one field`);
    for (const [kind, set] of matcherSets) {
      if (!isObject(set)) continue;
      for (const [path, m] of Object.entries(set)) {
        const where = `${at}.${kind}["${path}"]`;
        if (kind === "matchers") checkPath(path, where, problems);
        if (!isObject(m)) {
          problems.push(`${where} must be an object`);
          continue;
        }
        for (const k of Object.keys(m)) need(MATCHER_KEYS.has(k), `${where}: unknown matcher key "${k}"`);
        need(m["type"] === undefined || (MATCHER_TYPES as readonly unknown[]).includes(m["type"]), `${where}.type must be one of ${MATCHER_TYPES.join(", ")}`);
        for (const k of ["min", "max"]) need(m[k] === undefined || asBigInt(m[k]) !== undefined, `${where}.${k} must be an integer`);
        for (const k of ["minItems", "maxItems"]) need(m[k] === undefined || (Number.isInteger(m[k]) && Number(m[k]) >= 0), `${where}.${k} must be a count`);
        need(m["oneOf"] === undefined || (Array.isArray(m["oneOf"]) && m["oneOf"].length > 0), `${where}.oneOf must be a non-empty list`);
        for (const k of ["sameAs", "countOf"]) if (typeof m[k] === "string") checkPath(String(m[k]).replace(/^\$request\./, ""), `${where}.${k}`, problems);
        if (typeof m["pattern"] === "string") {
          try {
            new RegExp(m["pattern"]);
          } catch {
            problems.push(`${where}.pattern is not a regular expression`);
          }
        }
      }
    }
    const ex = i["example"];
    need(isObject(ex) && typeof ex["subject"] === "string" && isObject(ex["message"]), `${at}.example needs a subject and a message`);
  });
  if (problems.length > 0) throw new Error(`${source}: invalid message contract:\n  - ${problems.join("\n  - ")}`);
  return value as unknown as MessageContract;
}

/** Reads and checks one contract file. @throws Error if unreadable or invalid */
export function readMessageContract(file: string): MessageContract {
  return parseMessageContract(JSON.parse(readFileSync(file, "utf8")) as unknown, file);
}

/**
 * Checks one message against an interaction: its subject (or its request's), its headers, and
 * every matcher on its decoded body.
 * @returns the failures; empty when the message meets the interaction
 */
export function verifyMessage(interaction: MessageInteraction, message: CapturedMessage, options: VerifyOptions = {}): ContractFailure[] {
  const failures: ContractFailure[] = [];
  const fail = (path: string, expected: string, got: string) => failures.push({ interaction: interaction.description, path, expected, got });
  const prefix = options.prefix ?? DEFAULT_PREFIX;
  const reply = interaction.replyTo !== undefined;
  const pattern = (interaction.replyTo ?? interaction.subject)!;
  const subject = reply ? message.request?.subject : message.subject;
  if (subject === undefined) fail("request", `a reply to ${pattern}`, "a message without its request");
  else if (!subjectMatcher(pattern, prefix).test(subject)) fail(reply ? "request subject" : "subject", pattern, subject);

  const body = decodeJson(interaction.messageType, message.data);
  if (body instanceof Error) {
    fail("message", `a ${interaction.messageType}`, body.message);
    return failures;
  }
  let request: unknown;
  if (interaction.requestType !== undefined && message.request !== undefined) {
    request = decodeJson(interaction.requestType, message.request.data);
    if (request instanceof Error) fail("request", `a ${interaction.requestType}`, request.message);
  }
  const ctx: Context = { body, request };
  for (const [name, m] of Object.entries(interaction.headers ?? {})) {
    for (const f of checkValue(m, { path: `header ${name}`, value: header(message.headers, name), each: [] }, ctx, true))
      fail(`header ${name}`, f.expected, f.got);
  }
  for (const [path, m] of Object.entries(interaction.matchers)) {
    const { found, problems } = resolve(body, parsePath(path));
    for (const p of problems) fail(p.path, p.expected, p.got);
    for (const v of found) for (const f of checkValue(m, v, ctx, false)) fail(v.path, f.expected, f.got);
  }
  return failures;
}

/**
 * Checks an interaction against the messages captured while the provider was in its `given` state:
 * at least one must be on the interaction's subject, and every one that is must meet it.
 */
export function verifyInteraction(interaction: MessageInteraction, messages: readonly CapturedMessage[], options: VerifyOptions = {}): ContractFailure[] {
  const re = subjectMatcher((interaction.replyTo ?? interaction.subject)!, options.prefix ?? DEFAULT_PREFIX);
  const mine = messages.filter((m) => re.test((interaction.replyTo === undefined ? m.subject : m.request?.subject) ?? ""));
  if (mine.length === 0) {
    const seen = [...new Set(messages.map((m) => m.request?.subject ?? m.subject))].slice(0, 5).join(", ");
    return [
      {
        interaction: interaction.description,
        path: "subject",
        expected: `a message on ${interaction.replyTo ?? interaction.subject} given "${interaction.given}"`,
        got: seen === "" ? "no message" : `only ${seen}`,
      },
    ];
  }
  return mine.flatMap((m) => verifyMessage(interaction, m, options));
}

/**
 * The interaction's example as it would go over the bus. For a reply, fields with `sameAs:
 * "$request.…"` are taken from `request` (the request being answered) when one is given.
 */
export function exampleMessage(interaction: MessageInteraction, options: VerifyOptions & { readonly request?: CapturedMessage } = {}): CapturedMessage {
  const prefix = options.prefix ?? DEFAULT_PREFIX;
  const ex = interaction.example;
  const message = structuredClone(ex.message);
  let request: CapturedMessage["request"];
  if (interaction.requestType !== undefined) {
    const codec = messageCodec(interaction.requestType);
    const data = options.request?.data ?? (ex.request === undefined ? undefined : codec.encode(codec.fromJSON(ex.request) as never).finish());
    if (data !== undefined) {
      request = { subject: options.request?.subject ?? ex.subject.replaceAll("<prefix>", prefix), data };
      const requestJson = codec.toJSON(codec.decode(data) as never);
      for (const [path, m] of Object.entries(interaction.matchers)) {
        if (m.sameAs?.startsWith("$request.") !== true) continue;
        for (const f of resolve(message, parsePath(path)).found) {
          const other = lookup(requestJson, m.sameAs.slice("$request.".length), f.each);
          if (f.holder !== undefined) f.holder.obj[f.holder.key as never] = other as never;
        }
      }
    }
  }
  const codec = messageCodec(interaction.messageType);
  return {
    subject: request === undefined ? ex.subject.replaceAll("<prefix>", prefix) : "_INBOX.example",
    headers: ex.headers ?? {},
    data: codec.encode(codec.fromJSON(message) as never).finish(),
    ...(request === undefined ? {} : { request }),
  };
}

/**
 * Checks an interaction's example against itself: canonical proto3 JSON (a misspelt key or a
 * default written out would be lost on the wire), every field and header a matcher names shown in
 * it, and the interaction met by it.
 */
export function checkExample(interaction: MessageInteraction, options: VerifyOptions = {}): ContractFailure[] {
  const failures: ContractFailure[] = [];
  const fail = (path: string, expected: string, got: string) => failures.push({ interaction: interaction.description, path, expected, got });
  const ex = interaction.example;
  const canonical: Array<[string, string | undefined, Record<string, unknown> | undefined]> = [
    ["example.message", interaction.messageType, ex.message],
    ["example.request", interaction.requestType, ex.request],
  ];
  for (const [where, type, json] of canonical) {
    if (type === undefined) continue;
    if (json === undefined) {
      fail(where, `a ${type} (the request a reply answers)`, "absent");
      continue;
    }
    const codec = messageCodec(type);
    const diff = firstDifference(json, codec.toJSON(codec.fromJSON(json) as never), where);
    if (diff !== undefined) fail(diff, `canonical proto3 JSON of ${type}`, "a key it does not have, a value of the wrong type, or a default written out");
  }
  for (const path of Object.keys(interaction.matchers)) {
    const { found } = resolve(ex.message, parsePath(path));
    if (found.length === 0 || found.some((f) => f.value === undefined)) fail(`example.message.${path}`, "shown in the example", "absent");
  }
  for (const name of Object.keys(interaction.headers ?? {}))
    if (header(ex.headers ?? {}, name) === undefined) fail(`example.headers.${name}`, "shown in the example", "absent");
  if (failures.length > 0) return failures;
  return verifyMessage(interaction, exampleMessage(interaction, options), options).map((f) => ({ ...f, path: `example: ${f.path}` }));
}

/** Failures as lines a person can act on; the same failure in many messages is one line with a count. */
export function formatFailures(failures: readonly ContractFailure[]): string {
  const lines = new Map<string, number>();
  for (const f of failures) {
    const line = `${f.interaction}: ${f.path}: expected ${f.expected}, got ${f.got}`;
    lines.set(line, (lines.get(line) ?? 0) + 1);
  }
  return [...lines].map(([line, n]) => (n === 1 ? line : `${line} (in ${n} messages)`)).join("\n");
}

// ---- paths -------------------------------------------------------------------------------------

type Segment = { readonly field: string } | { readonly index: number | "*" };

/** A value found at a concrete path; `each` holds the indexes `[*]` took, `holder` where it lives. */
interface Found {
  readonly path: string;
  readonly value: unknown;
  readonly each: readonly number[];
  readonly holder?: { readonly obj: Record<string, unknown> | unknown[]; readonly key: string | number };
}

const SEGMENT = /^(?:\.?([A-Za-z_][A-Za-z0-9_]*)|\[(\*|-?\d+)\])/;

function parsePath(path: string): Segment[] {
  const out: Segment[] = [];
  for (let rest = path; rest !== "";) {
    const m = SEGMENT.exec(rest);
    if (m === null || (out.length === 0 && rest.startsWith("."))) throw new Error(`bad path "${path}" at "${rest}"`);
    out.push(m[1] !== undefined ? { field: m[1] } : { index: m[2] === "*" ? "*" : Number(m[2]) });
    rest = rest.slice(m[0].length);
  }
  if (out.length === 0) throw new Error("empty path");
  return out;
}

function checkPath(path: string, where: string, problems: string[]): void {
  try {
    parsePath(path);
  } catch (err) {
    problems.push(`${where}: ${(err as Error).message}`);
  }
}

/** Every value a path reaches. `[*]` over an empty or absent list is a problem: a consumer that reads each element relies on there being one. */
function resolve(root: unknown, segments: readonly Segment[]): { found: Found[]; problems: Array<{ path: string; expected: string; got: string }> } {
  let found: Found[] = [{ path: "", value: root, each: [] }];
  const problems: Array<{ path: string; expected: string; got: string }> = [];
  for (const s of segments) {
    const next: Found[] = [];
    for (const f of found) {
      if ("field" in s) {
        const path = f.path === "" ? s.field : `${f.path}.${s.field}`;
        const obj = isObject(f.value) ? f.value : undefined;
        next.push({ path, value: obj?.[s.field], each: f.each, ...(obj === undefined ? {} : { holder: { obj, key: s.field } }) });
        continue;
      }
      const list = f.value ?? [];
      if (!Array.isArray(list)) {
        problems.push({ path: f.path, expected: "a list", got: show(f.value) });
        continue;
      }
      if (s.index === "*") {
        if (list.length === 0) problems.push({ path: `${f.path}[*]`, expected: "at least one element", got: "none" });
        list.forEach((value: unknown, i) => next.push({ path: `${f.path}[${i}]`, value, each: [...f.each, i], holder: { obj: list, key: i } }));
      } else {
        const i = s.index < 0 ? list.length + s.index : s.index;
        next.push({ path: `${f.path}[${i < 0 ? s.index : i}]`, value: list[i], each: f.each });
      }
    }
    found = next;
  }
  return { found, problems };
}

/** The value at a path whose `[*]`s take the given indexes in order (`$request.` paths read the request). */
function lookup(root: unknown, path: string, each: readonly number[]): unknown {
  return resolve(root, parsePath(aligned(path, each))).found[0]?.value;
}

/** The path with its `[*]`s replaced by the given indexes, in order. */
function aligned(path: string, each: readonly number[]): string {
  let k = 0;
  return path.replace(/\[\*\]/g, () => `[${each[k++] ?? 0}]`);
}

// ---- matching ----------------------------------------------------------------------------------

interface Context {
  readonly body: unknown;
  readonly request: unknown;
}

const U32_MAX = 0xffff_ffffn;
const U64_MAX = (1n << 64n) - 1n;
/** What proto3 JSON leaves out: the type's default (enums, messages and timestamps have none to show). */
const DEFAULTS: Partial<Record<MatcherType, unknown>> = { uint32: 0, uint64: "0", string: "", bool: false, bytes: "" };

function checkValue(m: Matcher, f: Found, ctx: Context, isHeader: boolean): Array<{ expected: string; got: string }> {
  const out: Array<{ expected: string; got: string }> = [];
  const refOf = (path: string) => (path.startsWith("$request.") ? { root: ctx.request, path: path.slice(9) } : { root: ctx.body, path });
  if (m.minItems !== undefined || m.maxItems !== undefined || (m.countOf !== undefined && !isHeader)) {
    const list = f.value ?? [];
    if (!Array.isArray(list)) return [{ expected: "a list", got: show(f.value) }];
    if (m.minItems !== undefined && list.length < m.minItems) out.push({ expected: `at least ${m.minItems} element(s)`, got: String(list.length) });
    if (m.maxItems !== undefined && list.length > m.maxItems) out.push({ expected: `at most ${m.maxItems} element(s)`, got: String(list.length) });
    if (m.countOf !== undefined) {
      const r = refOf(m.countOf);
      const n = asList(lookup(r.root, r.path, f.each)).length;
      if (list.length !== n) out.push({ expected: `as many elements as ${aligned(m.countOf, f.each)} (${n})`, got: String(list.length) });
    }
    return out;
  }
  // Proto3 JSON leaves defaults out; a header has no default.
  const v = f.value === undefined && !isHeader && m.type !== undefined ? DEFAULTS[m.type] : f.value;
  if (v === undefined)
    return [{ expected: describeMatcher(m), got: isHeader ? "no such header" : m.type === "enum" ? "absent (the enum's zero value)" : "absent" }];
  if (m.type !== undefined && !hasType(m.type, v)) out.push({ expected: m.type, got: show(v) });
  if (m.oneOf !== undefined && !m.oneOf.some((o) => String(o) === String(v))) out.push({ expected: `one of ${m.oneOf.join(", ")}`, got: show(v) });
  if (m.min !== undefined || m.max !== undefined) {
    const n = asBigInt(v);
    if (n === undefined) out.push({ expected: "an integer", got: show(v) });
    else if ((m.min !== undefined && n < BigInt(m.min)) || (m.max !== undefined && n > BigInt(m.max)))
      out.push({ expected: `an integer in [${m.min ?? "…"}, ${m.max ?? "…"}]`, got: show(v) });
  }
  if (m.nonEmpty === true && (typeof v !== "string" || v === "")) out.push({ expected: "a non-empty string", got: show(v) });
  if (m.pattern !== undefined && (typeof v !== "string" || !new RegExp(m.pattern).test(v)))
    out.push({ expected: `text matching /${m.pattern}/`, got: show(v) });
  if (m.sameAs !== undefined) {
    const r = refOf(m.sameAs);
    const other = lookup(r.root, r.path, f.each) ?? (m.type === undefined ? undefined : DEFAULTS[m.type]);
    if (String(other) !== String(v)) out.push({ expected: `the same as ${aligned(m.sameAs, f.each)} (${show(other)})`, got: show(v) });
  }
  if (m.countOf !== undefined) {
    const r = refOf(m.countOf);
    const n = asList(lookup(r.root, r.path, f.each)).length;
    if (String(v) !== String(n)) out.push({ expected: `the number of elements of ${aligned(m.countOf, f.each)} (${n})`, got: show(v) });
  }
  return out;
}

function hasType(type: MatcherType, v: unknown): boolean {
  switch (type) {
    case "uint32":
      return typeof v === "number" && Number.isInteger(v) && v >= 0 && BigInt(v) <= U32_MAX;
    case "uint64":
      return typeof v === "string" && /^(0|[1-9]\d*)$/.test(v) && BigInt(v) <= U64_MAX;
    case "string":
      return typeof v === "string";
    case "bool":
      return typeof v === "boolean";
    case "enum":
      return typeof v === "string" && v !== "UNRECOGNIZED";
    case "bytes":
      return typeof v === "string" && /^[A-Za-z0-9+/]*={0,2}$/.test(v);
    case "timestamp":
      return typeof v === "string" && !Number.isNaN(Date.parse(v));
  }
}

function describeMatcher(m: Matcher): string {
  const parts = [
    m.type,
    m.oneOf && `one of ${m.oneOf.join(", ")}`,
    m.min !== undefined && `≥ ${m.min}`,
    m.nonEmpty && "non-empty",
    m.pattern && `/${m.pattern}/`,
  ];
  return parts.filter((p) => typeof p === "string").join(", ") || "a value";
}

// ---- helpers -----------------------------------------------------------------------------------

function decodeJson(type: string, data: Uint8Array): unknown {
  try {
    const codec = messageCodec(type);
    return codec.toJSON(codec.decode(data) as never);
  } catch (err) {
    return new Error(`undecodable as ${type}: ${err instanceof Error ? err.message : String(err)}`);
  }
}

function header(headers: Readonly<Record<string, string>>, name: string): string | undefined {
  if (headers[name] !== undefined) return headers[name];
  const key = Object.keys(headers).find((k) => k.toLowerCase() === name.toLowerCase());
  return key === undefined ? undefined : headers[key];
}

/** `<prefix>` → the prefix as given; any other `<name>` → one subject token. */
function subjectMatcher(pattern: string, prefix: string): RegExp {
  const parts = pattern.split(/(<[^>]+>)/).map((p) => (p === "<prefix>" ? escape(prefix) : /^<[^>]+>$/.test(p) ? "[^.]+" : escape(p)));
  return new RegExp(`^${parts.join("")}$`);
}

function escape(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

/** The first path where two JSON values differ, or undefined. */
function firstDifference(a: unknown, b: unknown, path: string): string | undefined {
  if (isObject(a) && isObject(b)) {
    for (const k of new Set([...Object.keys(a), ...Object.keys(b)])) {
      const d = firstDifference(a[k], b[k], `${path}.${k}`);
      if (d !== undefined) return d;
    }
    return undefined;
  }
  if (Array.isArray(a) && Array.isArray(b)) {
    for (let i = 0; i < Math.max(a.length, b.length); i++) {
      const d = firstDifference(a[i], b[i], `${path}[${i}]`);
      if (d !== undefined) return d;
    }
    return undefined;
  }
  return Object.is(a, b) ? undefined : path;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function asList(v: unknown): unknown[] {
  return Array.isArray(v) ? v : [];
}

function asBigInt(v: unknown): bigint | undefined {
  if (typeof v === "number" && Number.isInteger(v)) return BigInt(v);
  if (typeof v === "string" && /^-?\d+$/.test(v)) return BigInt(v);
  return undefined;
}

function show(v: unknown): string {
  if (v === undefined) return "absent";
  return typeof v === "string" ? JSON.stringify(v) : JSON.stringify(v, (_k, x: unknown) => (typeof x === "bigint" ? String(x) : x));
}

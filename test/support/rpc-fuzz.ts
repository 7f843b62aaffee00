import { readFileSync } from "node:fs";
import { Client, credentials, Metadata, status as GrpcStatus, type ServiceError } from "@grpc/grpc-js";
import { loadFileDescriptorSetFromBuffer, type PackageDefinition } from "@grpc/proto-loader";
import { BinaryWriter, WireType } from "@bufbuild/protobuf/wire";
import type { Prng } from "@ioasid/chaos";
import { toDomainError } from "@ioasid/grpc-kit";
import { descriptorSetPath } from "@ioasid/proto";

// Bad-input fuzzing of every RPC (issue 14's acceptance; DESIGN §8): requests are built as bytes
// from the contracts' own descriptors (the FileDescriptorSet every server reflects), so a new RPC,
// field or service is fuzzed without a change here, and sent through a grpc-js client that does
// not serialize (the bytes reach the server's decoder as they are).

/** One RPC of a served service, with its request message's schema. */
export interface FuzzMethod {
  /** `ioasid.core.v1.CoreService/Alloc` */
  readonly name: string;
  readonly path: string;
  readonly service: string;
  readonly requestStream: boolean;
  readonly responseStream: boolean;
  readonly request: MessageSchema;
}

interface FieldSchema {
  readonly name: string;
  readonly number: number;
  readonly type: string;
  readonly repeated: boolean;
  /** Fully qualified message or enum type name, for TYPE_MESSAGE / TYPE_ENUM. */
  readonly typeName: string;
}

interface MessageSchema {
  readonly fullName: string;
  readonly fields: readonly FieldSchema[];
}

interface DescriptorField {
  name: string;
  number: number;
  label: string;
  type: string;
  typeName: string;
}

/** The schemas of every message, enum and service in the project's descriptor set. */
export class ContractSchemas {
  readonly #defs: PackageDefinition;
  readonly #messages = new Map<string, MessageSchema>();

  constructor() {
    this.#defs = loadFileDescriptorSetFromBuffer(readFileSync(descriptorSetPath));
  }

  /** Every RPC of the named services, in contract order. */
  methodsOf(serviceNames: readonly string[]): FuzzMethod[] {
    const out: FuzzMethod[] = [];
    for (const service of serviceNames) {
      const def = this.#defs[service] as
        Record<string, { path: string; requestStream: boolean; responseStream: boolean; requestType: { type: { name: string } } }> | undefined;
      if (def === undefined) continue;
      for (const [rpc, m] of Object.entries(def)) {
        const pkg = service.slice(0, service.lastIndexOf("."));
        out.push({
          name: `${service}/${rpc}`,
          path: m.path,
          service,
          requestStream: m.requestStream,
          responseStream: m.responseStream,
          request: this.message(this.#resolve(m.requestType.type.name, pkg)),
        });
      }
    }
    return out;
  }

  /** The numeric values of an enum (empty when unknown). */
  enumValues(fullName: string): number[] {
    const e = this.#defs[fullName] as { type?: { value?: Array<{ number: number }> } } | undefined;
    return (e?.type?.value ?? []).map((v) => v.number);
  }

  message(fullName: string): MessageSchema {
    let m = this.#messages.get(fullName);
    if (m !== undefined) return m;
    const d = this.#defs[fullName] as { type?: { field?: DescriptorField[] } } | undefined;
    const pkg = fullName.slice(0, fullName.lastIndexOf("."));
    m = {
      fullName,
      fields: (d?.type?.field ?? []).map((f) => ({
        name: f.name,
        number: f.number,
        type: f.type,
        repeated: f.label === "LABEL_REPEATED",
        typeName: f.typeName === "" ? "" : this.#resolve(f.typeName, pkg),
      })),
    };
    this.#messages.set(fullName, m);
    return m;
  }

  /** A type name as the descriptor gives it (relative, or qualified) → its key in the definition. */
  #resolve(typeName: string, pkg: string): string {
    const name = typeName.replace(/^\./, "");
    if (this.#defs[name] !== undefined) return name;
    // Relative names resolve from the innermost scope outwards (protobuf's scoping rules).
    for (let scope = pkg; scope !== ""; scope = scope.slice(0, Math.max(0, scope.lastIndexOf(".")))) {
      if (this.#defs[`${scope}.${name}`] !== undefined) return `${scope}.${name}`;
    }
    const suffix = Object.keys(this.#defs).filter((k) => k.endsWith(`.${name}`));
    return suffix.length === 1 ? suffix[0]! : name;
  }
}

/** The kinds of bad input every RPC gets (issue 14 acceptance). */
export const InputKind = {
  RANDOM_BYTES: "random-bytes",
  TRUNCATED: "truncated",
  WRONG_TYPES: "wrong-types",
  HUGE_STRINGS: "huge-strings",
  BOUNDARY_NUMBERS: "boundary-numbers",
  UNKNOWN_IDS: "unknown-ids",
} as const;
export type InputKind = (typeof InputKind)[keyof typeof InputKind];

/** How many of each kind an RPC gets (40 in all). */
export const INPUT_MIX: ReadonlyArray<readonly [InputKind, number]> = [
  [InputKind.RANDOM_BYTES, 8],
  [InputKind.TRUNCATED, 6],
  [InputKind.WRONG_TYPES, 6],
  [InputKind.HUGE_STRINGS, 5],
  [InputKind.BOUNDARY_NUMBERS, 8],
  [InputKind.UNKNOWN_IDS, 7],
];

/** Length of the strings of HUGE_STRINGS inputs. */
export const HUGE_STRING_CHARS = 20_000;
/** The character HUGE_STRINGS inputs repeat: a message quoting more than a prefix shows a run of it. */
export const HUGE_CHAR = "z";
/** Longest run of {@link HUGE_CHAR} a refusal may show (quote() keeps 64 characters). */
export { MAX_QUOTED_CHARS as MAX_QUOTED_RUN } from "@ioasid/errors";

const U32_BOUNDARIES = [0n, 1n, 0x7fffffffn, 0xfffffffen, 0xffffffffn, (1n << 20n) - 1n, 1n << 20n];
const U64_BOUNDARIES = [...U32_BOUNDARIES, 1n << 32n, (1n << 63n) - 1n, 1n << 63n, (1n << 64n) - 1n];
const VARINT_TYPES = new Set(["TYPE_UINT32", "TYPE_INT32", "TYPE_UINT64", "TYPE_INT64", "TYPE_BOOL", "TYPE_ENUM", "TYPE_SINT32", "TYPE_SINT64"]);
const MAX_DEPTH = 3;

/** Makes the request bytes of one input of a kind, from a seeded generator. */
export class InputMaker {
  constructor(
    private readonly schemas: ContractSchemas,
    private readonly rng: Prng,
  ) {}

  make(kind: InputKind, schema: MessageSchema): Buffer {
    const rng = this.rng;
    switch (kind) {
      case InputKind.RANDOM_BYTES: {
        const bytes = Buffer.alloc(rng.int(1, 64));
        for (let i = 0; i < bytes.length; i++) bytes[i] = rng.int(0, 255);
        return bytes;
      }
      case InputKind.TRUNCATED: {
        const whole = this.#encode(schema, InputKind.UNKNOWN_IDS, 0);
        // A message of one short field cannot be cut meaningfully: cut inside a padded copy instead.
        const full = whole.length >= 2 ? whole : Buffer.concat([whole, this.#encode(schema, InputKind.HUGE_STRINGS, 0)]);
        return full.length >= 2 ? full.subarray(0, rng.int(1, full.length - 1)) : Buffer.from([0x0a, 0x05]);
      }
      default:
        return this.#encode(schema, kind, 0);
    }
  }

  #encode(schema: MessageSchema, kind: InputKind, depth: number): Buffer {
    const w = new BinaryWriter();
    for (const f of schema.fields) {
      const count = f.repeated ? this.rng.int(0, 2) : this.rng.chance(0.85) ? 1 : 0;
      for (let i = 0; i < count; i++) this.#field(w, f, kind, depth);
    }
    return Buffer.from(w.finish());
  }

  #field(w: BinaryWriter, f: FieldSchema, kind: InputKind, depth: number): void {
    const rng = this.rng;
    if (kind === InputKind.WRONG_TYPES && rng.chance(0.7)) {
      // The field number with a wire type its declared type does not have.
      if (VARINT_TYPES.has(f.type)) w.tag(f.number, WireType.LengthDelimited).bytes(Buffer.from("not a number"));
      else if (f.type === "TYPE_STRING" || f.type === "TYPE_BYTES" || f.type === "TYPE_MESSAGE") w.tag(f.number, WireType.Varint).uint64(rng.int(0, 1 << 30));
      else w.tag(f.number, rng.pick([WireType.Varint, WireType.LengthDelimited])).uint32(rng.int(0, 255));
      return;
    }
    switch (f.type) {
      case "TYPE_STRING":
      case "TYPE_BYTES": {
        const s =
          kind === InputKind.HUGE_STRINGS ? HUGE_CHAR.repeat(HUGE_STRING_CHARS) : kind === InputKind.UNKNOWN_IDS ? `fuzz-unknown-${rng.int(1, 99_999)}` : "";
        w.tag(f.number, WireType.LengthDelimited).bytes(Buffer.from(s));
        return;
      }
      case "TYPE_MESSAGE": {
        if (depth >= MAX_DEPTH) return;
        w.tag(f.number, WireType.LengthDelimited).bytes(this.#encode(this.schemas.message(f.typeName), kind, depth + 1));
        return;
      }
      case "TYPE_BOOL":
        w.tag(f.number, WireType.Varint).uint64(kind === InputKind.BOUNDARY_NUMBERS ? rng.pick([0n, 1n, 2n, 0xffffffffn]) : rng.pick([0n, 1n]));
        return;
      case "TYPE_ENUM": {
        const values = this.schemas.enumValues(f.typeName);
        const v =
          kind === InputKind.BOUNDARY_NUMBERS
            ? rng.pick([0n, 0xffffffffn, 99n, BigInt(Math.max(0, ...values) + 1)])
            : BigInt(rng.pick(values.length > 0 ? values : [0]));
        w.tag(f.number, WireType.Varint).uint64(v);
        return;
      }
      case "TYPE_FIXED32":
      case "TYPE_SFIXED32":
      case "TYPE_FLOAT":
        w.tag(f.number, WireType.Bit32).fixed32(Number(rng.pick(U32_BOUNDARIES)));
        return;
      case "TYPE_FIXED64":
      case "TYPE_SFIXED64":
      case "TYPE_DOUBLE":
        w.tag(f.number, WireType.Bit64).fixed64(rng.pick(U64_BOUNDARIES));
        return;
      default: {
        // uint32/int32/uint64/int64/sint*: varints.
        const wide = f.type.endsWith("64");
        const v =
          kind === InputKind.BOUNDARY_NUMBERS
            ? rng.pick(wide ? U64_BOUNDARIES : U32_BOUNDARIES)
            : kind === InputKind.UNKNOWN_IDS
              ? BigInt(rng.int(900_000, 1_000_000))
              : BigInt(rng.int(0, 8));
        w.tag(f.number, WireType.Varint).uint64(v);
      }
    }
  }
}

/** What one raw call came back with. */
export interface RawOutcome {
  /** gRPC status code; OK for a unary answer or a stream that sent something. */
  readonly code: number;
  readonly reason: string;
  readonly message: string;
  readonly metadata: Readonly<Record<string, string>>;
}

const same = (b: Buffer): Buffer => b;

/** A grpc-js client that sends request bytes as they are, to one address. */
export class RawCaller {
  readonly #client: Client;

  constructor(address: string) {
    this.#client = new Client(address, credentials.createInsecure());
  }

  /**
   * Calls a unary or server-streaming RPC with `bytes`. A server stream that sends a message is
   * cancelled at once (the request was accepted); each call has a deadline.
   */
  call(method: FuzzMethod, bytes: Buffer, deadlineMs: number): Promise<RawOutcome> {
    const deadline = Date.now() + deadlineMs;
    const fromError = (err: ServiceError): RawOutcome => {
      const e = toDomainError(err);
      return { code: e.code, reason: e.reason, message: e.message, metadata: e.metadata };
    };
    if (method.requestStream) {
      throw new Error(`${method.name}: client-streaming RPCs are not fuzzed yet (none is served today)`);
    }
    if (!method.responseStream) {
      return new Promise((resolve) => {
        this.#client.makeUnaryRequest(method.path, same, same, bytes, new Metadata(), { deadline }, (err: ServiceError | null) =>
          resolve(err === null ? { code: GrpcStatus.OK, reason: "", message: "", metadata: {} } : fromError(err)),
        );
      });
    }
    return new Promise((resolve) => {
      const call = this.#client.makeServerStreamRequest(method.path, same, same, bytes, new Metadata(), { deadline });
      let done = false;
      const finish = (o: RawOutcome): void => {
        if (done) return;
        done = true;
        resolve(o);
      };
      call.on("data", () => {
        finish({ code: GrpcStatus.OK, reason: "", message: "", metadata: {} });
        call.cancel();
      });
      call.on("error", (err: ServiceError) => finish(fromError(err)));
      call.on("end", () => finish({ code: GrpcStatus.OK, reason: "", message: "", metadata: {} }));
    });
  }

  close(): void {
    this.#client.close();
  }
}

import { encodeToken, historyStreamName, roleStateStreamName } from "@ioasid/bus";

/** The roles that connect to NATS with their own user (DESIGN §11: a user per role instance). */
export const NATS_ROLES = ["core", "iommu", "kvm", "vdcm", "vfio", "operator"] as const;
export type NatsRole = (typeof NATS_ROLES)[number];

/** Who a NATS user is: a role and its instance (e.g. kvm/kvm0). */
export interface NatsIdentity {
  readonly role: NatsRole;
  readonly instance: string;
}

/** What nats-server enforces for one user (its `permissions` block). */
export interface NatsPermissions {
  readonly publish: { readonly allow: readonly string[]; readonly deny: readonly string[] };
  readonly subscribe: { readonly allow: readonly string[]; readonly deny: readonly string[] };
  /** Publish to the reply subject of a request the user received, once (an ack, a hello reply). */
  readonly allowResponses: boolean;
}

/** The op log's stream name (the core's default; `IOASID_CORE_OPS`). */
export const OP_LOG_STREAM = "IOASID_CORE_OPS";

/**
 * JetStream API requests that change or remove what a stream keeps. Nobody but the operator sends
 * them (DESIGN §4.6: "nobody but an operator deletes or purges a stream"); an update could shrink a
 * stream's limits and drop the op log as surely as a purge.
 */
export const STREAM_ADMIN_SUBJECTS = [
  "$JS.API.STREAM.DELETE.>",
  "$JS.API.STREAM.PURGE.>",
  "$JS.API.STREAM.UPDATE.>",
  "$JS.API.STREAM.MSG.DELETE.>",
  "$JS.API.STREAM.SNAPSHOT.>",
  "$JS.API.STREAM.RESTORE.>",
  "$JS.API.STREAM.PEER.>",
  "$JS.API.STREAM.LEADER.>",
  "$JS.API.META.>",
  "$JS.API.SERVER.>",
  "$JS.API.ACCOUNT.>",
  "$JS.API.CONSUMER.DURABLE.>",
  "$SYS.>",
] as const;

/**
 * The inbox prefix of a user: replies to its requests (JetStream API answers, publish acks, a
 * delivery's ack to the core) come there, and only it may subscribe to it — a shared `_INBOX.>`
 * would let any role read, and answer in place of, another role's replies.
 */
export function inboxPrefix(identity: NatsIdentity): string {
  return `_INBOX.${encodeToken(identity.role)}.${encodeToken(identity.instance)}`;
}

/**
 * The subject token of a role's deliveries, state and history. KVM subscribes, keeps state and
 * records history per VM (`deliver.kvm.vm-1`: "KVM must register IOASID notifier per VM instance",
 * ioasid.rst), so its user holds every `kvm` token; the others hold their instance's alone.
 */
function instanceToken(identity: NatsIdentity): string {
  return identity.role === "kvm" ? "*" : encodeToken(identity.instance);
}

/**
 * The permissions of a role instance's NATS user (DESIGN §4.6, §11).
 * - The core alone publishes deliveries (`deliver.>`) and writes the op log and its snapshots
 *   (`core.ops`, `core.snapshot.*`, both in the op log's stream); it creates the three
 *   streams, reads them through consumers, and answers hellos.
 * - A role subscribes only to its own delivery subject, in its own queue group (so nobody else can
 *   join the group and acknowledge in its place), and replies only to what it received
 *   (`allow_responses`: the ack of a delivery); it writes only its own role-state and history
 *   subjects; it reads the role-state stream through ephemeral consumers.
 * - No role holds JetStream admin rights ({@link STREAM_ADMIN_SUBJECTS} are denied to all but the
 *   operator, who has no limits).
 * @example natsPermissions("ioasid.v1", { role: "iommu", instance: "iommu0" }).subscribe.allow
 *   // ["ioasid.v1.deliver.iommu.iommu0 iommu.iommu0", "_INBOX.iommu.iommu0.>"]
 */
export function natsPermissions(prefix: string, identity: NatsIdentity): NatsPermissions | undefined {
  if (identity.role === "operator") return undefined;
  const inbox = `${inboxPrefix(identity)}.>`;
  const roleState = roleStateStreamName(prefix);
  const history = historyStreamName(prefix);
  const deny = [...STREAM_ADMIN_SUBJECTS];
  if (identity.role === "core") {
    const streams = [OP_LOG_STREAM, roleState, history];
    return {
      publish: {
        allow: [
          `${prefix}.deliver.>`,
          `${prefix}.core.ops`,
          // Snapshot chunks, in the op log's stream (issue 15): the core's alone, like the op log.
          `${prefix}.core.snapshot.*`,
          `${prefix}.history.ioasid.core`,
          // The serving core's lease (issue 18): a standby core pings it.
          `${prefix}.core.lease`,
          "$JS.API.INFO",
          ...streams.flatMap((s) => [
            `$JS.API.STREAM.INFO.${s}`,
            `$JS.API.STREAM.CREATE.${s}`,
            `$JS.API.STREAM.MSG.GET.${s}`,
            `$JS.API.DIRECT.GET.${s}`,
            `$JS.API.DIRECT.GET.${s}.>`,
            `$JS.API.CONSUMER.CREATE.${s}`,
            `$JS.API.CONSUMER.CREATE.${s}.>`,
            `$JS.API.CONSUMER.INFO.${s}.*`,
            `$JS.API.CONSUMER.MSG.NEXT.${s}.*`,
            `$JS.API.CONSUMER.DELETE.${s}.*`,
          ]),
          `$JS.ACK.${OP_LOG_STREAM}.>`,
        ],
        deny: [...deny, `${prefix}.rolestate.>`],
      },
      // The JetStream API audit advisory: the core records each stream administration call (§11).
      subscribe: { allow: [`${prefix}.core.hello`, `${prefix}.core.lease`, inbox, "$JS.EVENT.ADVISORY.API"], deny: [`${prefix}.deliver.>`] },
      allowResponses: true,
    };
  }
  const token = instanceToken(identity);
  const role = encodeToken(identity.role);
  return {
    publish: {
      allow: [
        `${prefix}.core.hello`,
        `${prefix}.rolestate.${role}.${token}.>`,
        `${prefix}.history.${role}.${token}`,
        "$JS.API.INFO",
        `$JS.API.STREAM.INFO.${roleState}`,
        `$JS.API.CONSUMER.CREATE.${roleState}`,
        `$JS.API.CONSUMER.CREATE.${roleState}.>`,
        `$JS.API.CONSUMER.INFO.${roleState}.*`,
        `$JS.API.CONSUMER.MSG.NEXT.${roleState}.*`,
        `$JS.API.CONSUMER.DELETE.${roleState}.*`,
      ],
      deny: [...deny, `${prefix}.deliver.>`, `${prefix}.core.ops`, `${prefix}.core.snapshot.>`],
    },
    subscribe: {
      allow: [`${prefix}.deliver.${role}.${token} ${role}.${token}`, inbox],
      deny: [],
    },
    allowResponses: true,
  };
}

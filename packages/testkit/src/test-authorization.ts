import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { connect } from "@nats-io/transport-node";
import {
  createNatsCredential,
  createStackCa,
  issueCertificate,
  natsConnectOptions,
  natsUserEntry,
  readInstanceCredentials,
  renderAuthorization,
  writeInstanceCredentials,
  writeNatsCredential,
  type InstanceCredentials,
  type NatsCredential,
  type NatsRole,
  type NatsUserEntry,
  type RoleIdentity,
} from "@ioasid/security";
import { waitFor } from "./wait-for.js";

/** A role instance's NATS credential made by a test's nats-server (`NatsServer.credentials`). */
export interface NatsRoleCredentials {
  /** The credentials directory (holds `nats.json`): give it to a service as IOASID_CREDENTIALS_DIR. */
  readonly dir: string;
  /** `{ IOASID_CREDENTIALS_DIR: dir }`, to spread into a service's environment. */
  readonly env: Readonly<Record<string, string>>;
  /** The credential itself (for a client the test makes as that role). */
  readonly credential: NatsCredential;
}

/** What a test's nats-server admits (DESIGN §11), the same whether it runs as a process or in a container. */
export interface TestAuthorizationOptions {
  /** `false`: no authorization. @default { anonymous: "operator" } */
  readonly auth?: false | { readonly anonymous?: "operator" | "refuse"; readonly prefix?: string };
  /** Certificates too (a CA of this server's own, one per credential). @default false */
  readonly tls?: boolean;
  /** Where the credentials directories go (on this machine: the services read them). */
  readonly dir: string;
}

/** How a server puts a new configuration in effect, and tells when it has. */
export interface ConfigReload {
  /** Writes the configuration with the current users where the server reads it. */
  readonly write: () => Promise<void>;
  /** Asks the running server to read it again (SIGHUP); false when no server runs (nothing to do). */
  readonly signal: () => Promise<boolean>;
  /** The URL a new user's test connection goes to. */
  readonly url: () => string;
}

/**
 * The users, credentials and certificates of a test's nats-server: an unlimited operator user (the
 * test itself; also the anonymous client unless `anonymous: "refuse"`) and, made on demand, a user per
 * role instance with its role's permissions, each added by rewriting the configuration and reloading.
 */
export class TestAuthorization {
  readonly operator: { readonly user: string; readonly pass: string } | undefined;
  private readonly auth: { readonly anonymous: "operator" | "refuse"; readonly prefix: string } | undefined;
  private readonly ca: ReturnType<typeof createStackCa> | undefined;
  private readonly roleCredentials = new Map<string, NatsRoleCredentials>();
  /** One new user at a time: each is a rewrite of the configuration and a reload. */
  private queue: Promise<unknown> = Promise.resolve();
  private operatorTlsMade: Promise<InstanceCredentials | undefined> | undefined;

  constructor(private readonly options: TestAuthorizationOptions) {
    this.auth = options.auth === false ? undefined : { anonymous: options.auth?.anonymous ?? "operator", prefix: options.auth?.prefix ?? "ioasid.v1" };
    this.operator = this.auth === undefined ? undefined : { user: "operator", pass: randomBytes(18).toString("base64url") };
    this.ca = options.tls === true ? createStackCa() : undefined;
  }

  /** The configuration lines of the authorization (none without it). */
  configLines(): string[] {
    if (this.auth === undefined || this.operator === undefined) return [];
    const users: NatsUserEntry[] = [
      { user: this.operator.user, password: this.operator.pass, permissions: undefined, comment: "operator (the test)" },
      ...[...this.roleCredentials.values()].map((c) => natsUserEntry(this.auth!.prefix, c.credential)),
    ];
    return [renderAuthorization(users), ...(this.auth.anonymous === "operator" ? [`no_auth_user: ${this.operator.user}`] : [])];
  }

  /**
   * The credential of a role instance: made, added to the server's users and the configuration
   * reloaded the first time (in effect once the user can connect); the same one after. Undefined
   * without authorization.
   */
  credentials(role: NatsRole, instance: string, reload: ConfigReload): Promise<NatsRoleCredentials | undefined> {
    const next = this.queue.then(() => this.add(role, instance, reload));
    this.queue = next.catch(() => undefined);
    return next;
  }

  /** A credentials directory with a certificate only (with `tls`; else undefined). */
  async certificateDir(identity: RoleIdentity): Promise<string | undefined> {
    if (this.ca === undefined) return undefined;
    const credDir = join(this.options.dir, "credentials", `${identity.role}.${identity.instance}`);
    await this.certify(credDir, identity);
    return credDir;
  }

  /** The operator's certificate (with `tls`), what a test's gRPC clients present; else undefined. */
  operatorTls(): Promise<InstanceCredentials | undefined> {
    this.operatorTlsMade ??= (async () => {
      if (this.ca === undefined) return undefined;
      const credDir = join(this.options.dir, "credentials", "operator.test");
      await this.certify(credDir, { role: "operator", instance: "test" });
      return readInstanceCredentials(credDir);
    })();
    return this.operatorTlsMade;
  }

  private async certify(credDir: string, identity: RoleIdentity): Promise<void> {
    if (this.ca !== undefined) writeInstanceCredentials(credDir, (await this.ca).certPem, await issueCertificate(await this.ca, identity));
  }

  private async add(role: NatsRole, instance: string, reload: ConfigReload): Promise<NatsRoleCredentials | undefined> {
    if (this.auth === undefined) return undefined;
    const key = `${role}/${instance}`;
    const known = this.roleCredentials.get(key);
    if (known !== undefined) return known;
    const credential = createNatsCredential({ role, instance });
    const credDir = join(this.options.dir, "credentials", `${role}.${instance}`);
    writeNatsCredential(credDir, credential);
    await this.certify(credDir, { role, instance });
    const made: NatsRoleCredentials = { dir: credDir, env: { IOASID_CREDENTIALS_DIR: credDir }, credential };
    this.roleCredentials.set(key, made);
    await reload.write();
    if (!(await reload.signal())) return made;
    // A busy machine may take a while; the signal is sent again each second until it is in effect.
    let lastSignal = performance.now();
    await waitFor(
      async () => {
        const nc = await connect({ servers: reload.url(), ...natsConnectOptions(credential), reconnect: false, timeout: 2000 }).catch(() => undefined);
        await nc?.close();
        if (nc === undefined && performance.now() - lastSignal > 1000) {
          await reload.signal();
          lastSignal = performance.now();
        }
        return nc !== undefined;
      },
      { timeoutMs: 30_000, intervalMs: 50, message: `nats-server to accept the new user ${key}` },
    );
    return made;
  }
}

import { defaultMember, type NatsRole } from "@ioasid/security";
import type { NatsServer } from "./start-nats.js";

/**
 * The NATS part of a service's environment: `NATS_URL`, and the credentials directory of its role
 * instance (the instance read from `env` as the service would, else its default) when the server
 * has authorization — so a service under test runs with its own user and permissions, as in a
 * real stack. A `NatsCluster` serves as well (its URL list).
 * @example startService({ name: "kvm", entry, env: { ...(await natsEnv(nats, "kvm")), KVM_GRPC_ADDRESS: "127.0.0.1:0" } })
 */
export async function natsEnv(
  nats: Pick<NatsServer, "url" | "credentials">,
  role: Exclude<NatsRole, "operator">,
  env: Readonly<Record<string, string | undefined>> = {},
): Promise<Record<string, string>> {
  const d = defaultMember(role);
  const instance = (d.variable === undefined ? undefined : env[d.variable]) ?? d.instance;
  const credentials = await nats.credentials(role, instance);
  return { NATS_URL: nats.url, ...(credentials?.env ?? {}) };
}

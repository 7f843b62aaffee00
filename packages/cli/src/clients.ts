import { existsSync } from "node:fs";
import { join } from "node:path";
import { connect, type ConnectionOptions, type NatsConnection } from "@nats-io/transport-node";
import { createClient, createVfioSession, type PromiseClient, type VfioSession } from "@ioasid/grpc-kit";
import { core, iommu, kvm, vdcm, vfio } from "@ioasid/proto";
import { natsConnectOptions, readInstanceCredentials, readNatsCredential, type InstanceCredentials, type Role } from "@ioasid/security";
import type { StackState } from "./stack.js";

/** Clients of every service of a stack, and a NATS connection (history). */
export interface StackClients {
  readonly core: PromiseClient<typeof core.CoreServiceService>;
  readonly iommu: PromiseClient<typeof iommu.IommuServiceService>;
  /**
   * VFIO as the VMMs of this stack: its capability store remembers what OpenContainer answers and
   * was seeded with the capabilities `connectStack` was given (DESIGN §3).
   */
  readonly vfio: VfioSession;
  readonly kvm: PromiseClient<typeof kvm.KvmServiceService>;
  readonly vdcm: PromiseClient<typeof vdcm.VdcmServiceService>;
  readonly nc: NatsConnection;
  close(): Promise<void>;
}

/** Addresses of a stack's services (a StackState, or anything with the same shape). */
export interface StackAddresses {
  readonly natsUrl: string;
  /** How to authenticate to NATS (the operator's credential of a stack with authorization). */
  readonly natsAuth?: NatsAuth;
  /** The certificate to present to the services (the operator's, of a stack with mTLS). */
  readonly tls?: InstanceCredentials;
  readonly core: string;
  readonly iommu: string;
  readonly vfio: string;
  readonly kvm: string;
  readonly vdcm: string;
}

/** The credential options of a NATS connection (user and password, or an nkey authenticator). */
export type NatsAuth = Pick<ConnectionOptions, "user" | "pass" | "authenticator" | "inboxPrefix">;

/** The addresses of a running stack. */
export function addressesOf(state: StackState): StackAddresses {
  return {
    natsUrl: state.natsUrl,
    ...(state.operatorCredentials === undefined ? {} : operatorAuth(state.operatorCredentials)),
    core: coreTarget(state),
    iommu: state.services.iommu.address,
    vfio: state.services.vfio.address,
    kvm: state.services.kvm.address,
    vdcm: state.services.vdcm.address,
  };
}

/**
 * The gRPC target of a stack's core: its address, or with a standby (`up --standby-core`) both
 * cores' (`ipv4:a,b`): the channel uses the one that serves and moves on when it fails, so
 * ioasidctl follows a takeover without being told.
 */
export function coreTarget(state: StackState): string {
  const primary = state.services["ioasid-core"].address;
  return state.standbyCore === undefined ? primary : `ipv4:${primary},${state.standbyCore.address}`;
}

/** How the operator reaches a stack: its NATS user, and its certificate when the directory has one. */
export function operatorAuth(dir: string): Pick<StackAddresses, "natsAuth" | "tls"> {
  return {
    natsAuth: natsConnectOptions(readNatsCredential(dir)),
    ...(existsSync(join(dir, "cert.pem")) ? { tls: readInstanceCredentials(dir) } : {}),
  };
}

/** Clients of every service of a stack, without NATS (what `inspect` needs). */
export type ServiceClients = Omit<StackClients, "nc">;

/**
 * Clients of every service (each call has a 5 s deadline); nothing is connected until a call is
 * made, so a service that is down fails only the calls made to it.
 * @param capabilities as for {@link connectStack}
 */
export function connectServices(a: StackAddresses, capabilities: Iterable<readonly [number, Uint8Array]> = []): ServiceClients {
  // With the stack's certificates: mTLS, each server made to prove its role.
  const tls = (serverRole: Role) => (a.tls === undefined ? {} : { tls: a.tls, serverRole });
  const clients = {
    core: createClient(core.CoreServiceService, a.core, tls("core")),
    iommu: createClient(iommu.IommuServiceService, a.iommu, tls("iommu")),
    vfio: createVfioSession(createClient(vfio.VfioServiceService, a.vfio, tls("vfio")), capabilities),
    kvm: createClient(kvm.KvmServiceService, a.kvm, tls("kvm")),
    vdcm: createClient(vdcm.VdcmServiceService, a.vdcm, tls("vdcm")),
  };
  return {
    ...clients,
    close() {
      for (const c of Object.values(clients)) c.close();
      return Promise.resolve();
    },
  };
}

/**
 * Connects to every service (each call has a 5 s deadline) and to NATS.
 * @param capabilities VFIO capabilities of containers opened elsewhere (the VMM processes of
 *   `ioasidctl vm create`), so that calls naming them carry them
 */
export async function connectStack(a: StackAddresses, capabilities: Iterable<readonly [number, Uint8Array]> = []): Promise<StackClients> {
  const nc = await connect({ servers: natsServers(a.natsUrl), name: "ioasidctl", ...a.natsAuth });
  const services = connectServices(a, capabilities);
  return {
    ...services,
    nc,
    async close() {
      await services.close();
      await nc.close();
    },
  };
}

/** The servers of a NATS_URL: one URL, or a cluster's comma-separated (nats.js takes them as a list). */
export function natsServers(url: string): string[] {
  return url
    .split(",")
    .map((u) => u.trim())
    .filter((u) => u !== "");
}

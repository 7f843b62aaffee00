import { Metadata } from "@grpc/grpc-js";
import { vfio } from "@ioasid/proto";
import type { CallOptions, PromiseClient } from "./create-client.js";

/**
 * The request metadata that carries a VFIO container's capability (vfio.proto, file comment): every
 * VfioService call naming a container but OpenContainer and QueryState must send it, as
 * {@link encodeVfioCapability} writes it.
 */
export const VFIO_CAPABILITY_METADATA = "ioasid-vfio-capability";

/** A promise client of VfioService. */
export type VfioClient = PromiseClient<typeof vfio.VfioServiceService>;

/** A capability as it travels in {@link VFIO_CAPABILITY_METADATA}: lowercase hex (64 digits for 32 bytes). */
export function encodeVfioCapability(capability: Uint8Array): string {
  return Buffer.from(capability).toString("hex");
}

/**
 * The capability a {@link VFIO_CAPABILITY_METADATA} value holds, or undefined when it is not an
 * even-length run of hex digits (VFIO then refuses it as not the container's).
 */
export function decodeVfioCapability(text: string): Uint8Array | undefined {
  if (text.length === 0 || text.length % 2 !== 0 || !/^[0-9a-fA-F]+$/.test(text)) return undefined;
  return Buffer.from(text, "hex");
}

/** Call metadata carrying one capability, for a single call made without a {@link VfioSession}. */
export function vfioCapabilityMetadata(capability: Uint8Array): Readonly<Record<string, string>> {
  return { [VFIO_CAPABILITY_METADATA]: encodeVfioCapability(capability) };
}

/**
 * One VMM's VFIO client with its capability store: every VfioService method, where OpenContainer
 * remembers the capability it answered and every later call naming that container carries it.
 */
export interface VfioSession extends VfioClient {
  /** The capability remembered for the container, if this session opened it (or was given it). */
  capabilityOf(containerId: number): Uint8Array | undefined;
  /** Remembers a capability got elsewhere (a VMM process that opened the container and handed it over). */
  remember(containerId: number, capability: Uint8Array): void;
  /** Forgets a container's capability (calls naming it then carry none). */
  forget(containerId: number): void;
}

/**
 * Wraps a VfioService client as one VMM's session (DESIGN §3 "Authority is a capability, not a
 * name"): the store is this process's fds. It remembers the capability each OpenContainer made
 * through it answered, per container, and attaches it ({@link VFIO_CAPABILITY_METADATA}) to every
 * later call whose request names that container. A call naming a container the store does not
 * know goes out without one (VFIO refuses it with CAPABILITY_MISSING); a call whose options already
 * carry the metadata is sent as it is. Two VMMs are two sessions, even over one channel. Closing
 * a container does not forget it: later calls naming it still carry its capability (and are
 * answered CONTAINER_NOT_FOUND once it is gone).
 *
 * @example
 * const vmm = createVfioSession(createClient(vfio.VfioServiceService, address));
 * const { containerId } = await vmm.openContainer(vfio.OpenContainerRequest.fromPartial({ mmToken: 7n }));
 * await vmm.allocPasid({ containerId }); // carries the container's capability
 */
export function createVfioSession(client: VfioClient, known: Iterable<readonly [number, Uint8Array]> = []): VfioSession {
  const capabilities = new Map<number, string>();
  for (const [id, capability] of known) capabilities.set(id, encodeVfioCapability(capability));
  const withCapability = (containerId: unknown, options: CallOptions | undefined): CallOptions | undefined => {
    const hex = typeof containerId === "number" ? capabilities.get(containerId) : undefined;
    if (hex === undefined) return options;
    const given = options?.metadata;
    if (given instanceof Metadata) {
      if (given.get(VFIO_CAPABILITY_METADATA).length > 0) return options;
      const metadata = given.clone();
      metadata.set(VFIO_CAPABILITY_METADATA, hex);
      return { ...options, metadata };
    }
    if (given?.[VFIO_CAPABILITY_METADATA] !== undefined) return options;
    return { ...options, metadata: { ...given, [VFIO_CAPABILITY_METADATA]: hex } };
  };
  const session: Record<string, unknown> = {
    close: () => client.close(),
    raw: client.raw,
    address: client.address,
    capabilityOf: (containerId: number) => {
      const hex = capabilities.get(containerId);
      return hex === undefined ? undefined : Buffer.from(hex, "hex");
    },
    remember: (containerId: number, capability: Uint8Array) => void capabilities.set(containerId, encodeVfioCapability(capability)),
    forget: (containerId: number) => void capabilities.delete(containerId),
  };
  const methods = client as unknown as Record<string, (request: object, options?: CallOptions) => unknown>;
  // Every VfioService method takes one request (unary or server stream), so one wrapper serves all.
  for (const name of Object.keys(vfio.VfioServiceService)) {
    const method = methods[name]!;
    session[name] =
      name === "openContainer"
        ? async (request: vfio.OpenContainerRequest, options?: CallOptions) => {
            const opened = (await method(request, options)) as vfio.OpenContainerResponse;
            if (opened.capability.length > 0) capabilities.set(opened.containerId, encodeVfioCapability(opened.capability));
            return opened;
          }
        : (request: { readonly containerId?: unknown }, options?: CallOptions) => method(request, withCapability(request.containerId, options));
  }
  return session as unknown as VfioSession;
}

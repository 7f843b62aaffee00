import { fileURLToPath } from "node:url";

/**
 * Path of the binary FileDescriptorSet of every contract (written by `npm run gen`), for gRPC
 * server reflection.
 */
export const descriptorSetPath: string = fileURLToPath(new URL("../descriptors.binpb", import.meta.url));

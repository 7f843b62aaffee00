import { createClient, createVfioSession, encodeVfioCapability, loadCredentials } from "@ioasid/grpc-kit";
import { vfio } from "@ioasid/proto";

/**
 * The VMM process behind `ioasidctl vm create`: it opens the VM's container with VFIO and holds
 * its Session for as long as it lives, as a real VMM does. SIGTERM closes the container cleanly;
 * SIGKILL (`ioasidctl vm crash`) is the crashed-VMM path: VFIO sees the session drop and frees
 * every IOASID of the VM's set. Prints one JSON line with the container when it is open, with its
 * capability (hex) so that `ioasidctl` commands can act for the VM (DESIGN §3: the capability is
 * the authority over the container; whoever reads that line holds it).
 */
export async function runVmmAgent(options: { vfioAddress: string; mmToken: bigint; quota: number; vmName: string }): Promise<void> {
  // IOASID_CREDENTIALS_DIR: the VMM's certificate, when the stack has mTLS. This process is the
  // VMM: its session store holds the container's capability for every call.
  const tls = loadCredentials(process.env, { role: "vmm" });
  const client = createVfioSession(createClient(vfio.VfioServiceService, options.vfioAddress, tls === undefined ? {} : { tls, serverRole: "vfio" }));
  const opened = await client.openContainer(vfio.OpenContainerRequest.fromPartial({ mmToken: options.mmToken, quota: options.quota, vmName: options.vmName }));
  const session = new AbortController();
  let attached = false;
  const stream = (async () => {
    for await (const m of client.session({ containerId: opened.containerId }, { signal: session.signal })) {
      if (m.event?.$case === "attached" && !attached) {
        attached = true;
        process.stdout.write(
          `${JSON.stringify({ containerId: opened.containerId, setId: opened.setId, capability: encodeVfioCapability(opened.capability), pid: process.pid })}\n`,
        );
      }
      if (m.event?.$case === "closed") break;
    }
  })();
  const stop = async () => {
    await client.closeContainer({ containerId: opened.containerId }).catch(() => undefined);
    session.abort();
    client.close();
    process.exit(0);
  };
  process.on("SIGTERM", () => void stop());
  process.on("SIGINT", () => void stop());
  await stream.catch(() => undefined);
  client.close();
}

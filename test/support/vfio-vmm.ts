#!/usr/bin/env node
// A tiny VMM process for the VFIO tests: it plays the VMM side of a VM's life — optionally opens the
// container and allocates guest PASIDs (the virtual command) — and then holds the container's
// Session stream open, as a real VMM does for as long as it lives. Tests kill it (kill -9) to play a
// crashed VMM.
//   VFIO_ADDRESS        the vfio service
//   VMM_CONTAINER_ID    attach to this container, with its capability VMM_CAPABILITY (hex); or
//   VMM_MM_TOKEN        open a container for this MM token first (VMM_QUOTA, default 16)
//   VMM_PASIDS          guest PASIDs to allocate before attaching (default 0)
// Once attached it logs the line the testkit waits for, {"msg":"listening","address":"session:<id>",…}
// with the container, set, PASIDs and capability (hex); when the stream ends it logs {"msg":"session_end",…} and exits.
import { createClient, createVfioSession, decodeVfioCapability, encodeVfioCapability } from "@ioasid/grpc-kit";
import { vfio } from "@ioasid/proto";

const env = process.env;
const line = (o: Record<string, unknown>) => process.stdout.write(`${JSON.stringify(o)}\n`);
// This process is the VMM: its session store holds its container's capability (DESIGN §3).
const client = createVfioSession(createClient(vfio.VfioServiceService, env["VFIO_ADDRESS"] ?? "127.0.0.1:50053"));

let containerId = Number(env["VMM_CONTAINER_ID"] ?? "0");
const given = decodeVfioCapability(env["VMM_CAPABILITY"] ?? "");
if (containerId !== 0 && given !== undefined) client.remember(containerId, given);
const pasids: { hpasid: number; generation: number }[] = [];
if (containerId === 0) {
  const opened = await client.openContainer(
    vfio.OpenContainerRequest.fromPartial({ mmToken: BigInt(env["VMM_MM_TOKEN"] ?? "1"), quota: Number(env["VMM_QUOTA"] ?? "16"), vmName: "vmm-child" }),
  );
  containerId = opened.containerId;
}
const count = Number(env["VMM_PASIDS"] ?? "0");
for (let i = 0; i < count; i++) pasids.push(await client.allocPasid({ containerId }));

try {
  for await (const m of client.session({ containerId })) {
    if (m.event?.$case === "attached") {
      const capability = encodeVfioCapability(client.capabilityOf(containerId) ?? new Uint8Array(0));
      line({ msg: "listening", address: `session:${containerId}`, containerId, setId: m.event.value.setId, pasids, capability, pid: process.pid });
    } else if (m.event?.$case === "closed") {
      line({ msg: "session_closed", reason: vfio.closeReasonToJSON(m.event.value.reason) });
    }
  }
  line({ msg: "session_end", ok: true });
} catch (err) {
  line({ msg: "session_end", ok: false, error: String(err) });
}
client.close();

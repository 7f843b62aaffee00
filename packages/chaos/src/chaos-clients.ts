import { spawn, type ChildProcess } from "node:child_process";
import { createInterface } from "node:readline";
import { createClient, createVfioSession, decodeVfioCapability, type PromiseClient, type VfioSession } from "@ioasid/grpc-kit";
import { core, iommu, kvm, vdcm, vfio } from "@ioasid/proto";
import type { InstanceCredentials } from "@ioasid/security";
import type { StackService } from "./chaos-stack.js";

/** The driver's clients of the five services (called directly, not through the fault proxies). */
export interface ChaosClients {
  readonly core: PromiseClient<typeof core.CoreServiceService>;
  readonly iommu: PromiseClient<typeof iommu.IommuServiceService>;
  /**
   * VFIO with the capability store of the guests' VMMs: the driver acts for every guest's VMM, so
   * it remembers each container's capability as its VMM process hands it over (DESIGN §3).
   */
  readonly vfio: VfioSession;
  readonly kvm: PromiseClient<typeof kvm.KvmServiceService>;
  readonly vdcm: PromiseClient<typeof vdcm.VdcmServiceService>;
  close(): void;
}

/** The certificates the driver presents (see `ChaosStack.credentials`). */
export interface ChaosClientCredentials {
  /** The operator's: the core, the IOMMU, KVM and VDCM (the guest's MMIO, vCPUs and DMA are played as the operator, as `ioasidctl` plays them). */
  readonly operator: InstanceCredentials;
  /** A VMM's: VFIO, the only service a VMM reaches (DESIGN §11), as `ioasidctl vmm-agent` does. */
  readonly vmm: InstanceCredentials;
}

/**
 * Clients of every service of a chaos stack, over mTLS, each server made to prove its role by its
 * certificate. Every unary call has a deadline (`deadlineMs`): a stopped or partitioned service
 * makes a call `info` (indeterminate), never a hang.
 */
export function createChaosClients(addresses: Readonly<Record<StackService, string>>, credentials: ChaosClientCredentials, deadlineMs = 5000): ChaosClients {
  const as = (tls: InstanceCredentials, serverRole: "core" | "iommu" | "vfio" | "kvm" | "vdcm") => ({ deadlineMs, tls, serverRole });
  const clients = {
    core: createClient(core.CoreServiceService, addresses["ioasid-core"], as(credentials.operator, "core")),
    iommu: createClient(iommu.IommuServiceService, addresses.iommu, as(credentials.operator, "iommu")),
    vfio: createVfioSession(createClient(vfio.VfioServiceService, addresses.vfio, as(credentials.vmm, "vfio"))),
    kvm: createClient(kvm.KvmServiceService, addresses.kvm, as(credentials.operator, "kvm")),
    vdcm: createClient(vdcm.VdcmServiceService, addresses.vdcm, as(credentials.operator, "vdcm")),
  };
  return { ...clients, close: () => Object.values(clients).forEach((c) => c.close()) };
}

/** A guest's VMM process: it opened the VM's container and holds its VFIO Session while it lives. */
export interface VmmProcess {
  readonly pid: number;
  /**
   * The container and its VFIO capability, once the Session is attached; rejects when the process
   * ends first (its error output).
   */
  readonly opened: Promise<{ readonly containerId: number; readonly setId: number; readonly capability: Uint8Array }>;
  /** Settles when the process has ended. */
  readonly exited: Promise<{ readonly code: number | null; readonly signal: NodeJS.Signals | null }>;
  /** Sends a signal by PID (SIGKILL: the crashed VMM; SIGTERM: a clean exit). */
  kill(signal: NodeJS.Signals): void;
  running(): boolean;
}

/** How to start a VMM: the command prefix, given `--vfio ADDR --token T --quota Q --name N`. */
export type VmmCommand = readonly [string, ...string[]];

const liveVmms = new Set<ChildProcess>();
let exitHooked = false;

/**
 * Starts a VMM process (`ioasidctl vmm-agent`, as `ioasidctl vm create` does): it opens the
 * container for `mmToken` with `quota` and prints `{"containerId":…,"setId":…,"capability":…}` once its Session
 * is attached. Its stderr (the reason a failed open gives) is kept for the rejection.
 * `credentialsDir`: its VMM certificate (`IOASID_CREDENTIALS_DIR`), as `ioasidctl vm create` gives it.
 */
export function startVmm(
  command: VmmCommand,
  options: { vfioAddress: string; mmToken: bigint; quota: number; name: string; credentialsDir?: string },
): VmmProcess {
  if (!exitHooked) {
    exitHooked = true;
    // A driver that exits (or is interrupted twice) leaves no VMM behind: each is killed by PID.
    process.once("exit", () => {
      for (const c of liveVmms) c.kill("SIGKILL");
    });
  }
  const [file, ...pre] = command;
  const child = spawn(
    file,
    [...pre, "--vfio", options.vfioAddress, "--token", String(options.mmToken), "--quota", String(options.quota), "--name", options.name],
    {
      stdio: ["ignore", "pipe", "pipe"],
      // Set or emptied: a VMM never inherits another credential from the driver's environment.
      env: { ...process.env, IOASID_CREDENTIALS_DIR: options.credentialsDir ?? "" },
    },
  );
  let stderr = "";
  child.stderr!.on("data", (d: Buffer) => {
    if (stderr.length < 4000) stderr += String(d);
  });
  liveVmms.add(child);
  let ended = false;
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.once("error", (err) => {
      stderr += String(err);
      ended = true;
      liveVmms.delete(child);
      resolve({ code: null, signal: null });
    });
    child.once("close", (code, signal) => {
      ended = true;
      liveVmms.delete(child);
      resolve({ code, signal });
    });
  });
  const opened = new Promise<{ containerId: number; setId: number; capability: Uint8Array }>((resolve, reject) => {
    const rl = createInterface({ input: child.stdout! });
    rl.on("line", (line) => {
      if (!line.startsWith("{")) return;
      try {
        const o = JSON.parse(line) as { containerId?: number; setId?: number; capability?: string };
        const capability = typeof o.capability === "string" ? decodeVfioCapability(o.capability) : undefined;
        if (typeof o.containerId === "number" && typeof o.setId === "number" && capability !== undefined) {
          resolve({ containerId: o.containerId, setId: o.setId, capability });
        }
      } catch {
        // not the line we wait for
      }
    });
    void exited.then((s) =>
      reject(
        new Error(`the VMM exited (code ${String(s.code)}, signal ${String(s.signal)}) before its session attached: ${stderr.trim().split("\n").at(-1) ?? ""}`),
      ),
    );
  });
  opened.catch(() => undefined);
  return {
    pid: child.pid ?? -1,
    opened,
    exited,
    kill(signal) {
      if (!ended && child.pid !== undefined) child.kill(signal);
    },
    running: () => !ended,
  };
}

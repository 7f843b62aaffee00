import { connect } from "node:net";

/**
 * The INFO line a NATS server greets every client with (server id, host, port, `jetstream`…),
 * parsed: what a test reads to check how the server it talks to is configured.
 * @throws Error when nothing arrives within 2 s or the first line is not INFO
 */
export function readNatsInfo(port: number, host = "127.0.0.1"): Promise<Record<string, unknown>> {
  return new Promise((resolve, reject) => {
    const socket = connect({ host, port });
    let buffer = "";
    socket.setTimeout(2000, () => {
      socket.destroy();
      reject(new Error("no INFO line within 2 s"));
    });
    socket.on("data", (chunk) => {
      buffer += chunk.toString();
      const end = buffer.indexOf("\r\n");
      if (end === -1) return;
      socket.destroy();
      const line = buffer.slice(0, end);
      if (!line.startsWith("INFO ")) reject(new Error(`expected INFO, got ${line}`));
      else resolve(JSON.parse(line.slice(5)) as Record<string, unknown>);
    });
    socket.on("error", reject);
    // Closed without a word (a relay whose server is not listening yet): settle, never hang.
    socket.on("close", () => reject(new Error("closed before an INFO line")));
  });
}

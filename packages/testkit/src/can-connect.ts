import { connect } from "node:net";

/**
 * Whether a TCP connection to `host:port` can be opened now (it is closed again at once).
 * @param timeoutMs give up after this long. @default 1000
 */
export function canConnect(host: string, port: number, timeoutMs = 1000): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect({ host, port });
    const done = (ok: boolean): void => {
      socket.destroy();
      resolve(ok);
    };
    socket.setTimeout(timeoutMs, () => done(false));
    socket.once("connect", () => done(true));
    socket.once("error", () => done(false));
  });
}

/**
 * A base port for `ioasidctl up --base-port` below Linux's ephemeral range (32768–60999), where the
 * services of tests running beside this one listen on ports the kernel picks: a base inside it met
 * one of theirs now and then (CI: `up` exited 1 in ioasidctl-faults). `up` uses base … base+9 (the
 * gRPC ports, then the metrics ports) and these tests put NATS at base+10 (and a second stack at
 * +100…+110), all below 32768.
 */
export function randomBasePort(): number {
  return 20_000 + Math.floor(Math.random() * 12_000);
}

/** What `up` prints when one of its ports is taken (it checks before it starts anything). */
export const PORT_TAKEN = /port \d+ \(.*\) is in use on 127\.0\.0\.1/;

/**
 * Runs `start` on a random base port, again on another when `taken` says one of its ports was in
 * use (at most 3 times).
 */
export async function onFreePorts<T>(start: (base: number) => Promise<T>, taken: (result: T) => boolean): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    const result = await start(randomBasePort());
    if (!taken(result) || attempt === 3) return result;
  }
}

import { FaultKind } from "@ioasid/checker";

/**
 * The short fault names of `ioasidctl chaos run --faults` and the {@link FaultKind} each stands
 * for. `all` selects every kind.
 */
export const FAULT_NAMES = {
  kill: FaultKind.KILL_RESTART,
  stop: FaultKind.STOP_CONT,
  nats: FaultKind.NATS_RESTART,
  latency: FaultKind.LATENCY,
  drop: FaultKind.DROP,
  partition: FaultKind.PARTITION,
} as const satisfies Record<string, FaultKind>;

/** A chaos option that cannot be used as given (a usage error: nothing was started). */
export class ChaosUsageError extends Error {
  override readonly name = "ChaosUsageError";
}

/**
 * Parses a `--faults` list: `all`, `none`, or comma-separated short names (`kill,stop,nats,latency,
 * drop,partition`) or full kind names (`kill-restart`…). Order and repeats do not matter; the result
 * is in {@link FaultKind} order.
 * @throws ChaosUsageError on an empty list or an unknown name
 * @example
 * parseFaultKinds("kill,latency"); // ["kill-restart", "latency"]
 */
export function parseFaultKinds(text: string): FaultKind[] {
  const names = text
    .split(",")
    .map((s) => s.trim().toLowerCase())
    .filter((s) => s !== "");
  if (names.length === 0) throw new ChaosUsageError(`--faults needs a list: all, none, or some of ${Object.keys(FAULT_NAMES).join(",")}`);
  if (names.length === 1 && names[0] === "none") return [];
  const all = Object.values(FaultKind);
  const wanted = new Set<FaultKind>();
  for (const n of names) {
    if (n === "all") all.forEach((k) => wanted.add(k));
    else if (n in FAULT_NAMES) wanted.add(FAULT_NAMES[n as keyof typeof FAULT_NAMES]);
    else if ((all as string[]).includes(n)) wanted.add(n as FaultKind);
    else throw new ChaosUsageError(`unknown fault "${n}": use all, none, or some of ${Object.keys(FAULT_NAMES).join(",")}`);
  }
  return all.filter((k) => wanted.has(k));
}

const UNITS: Readonly<Record<string, number>> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 };

/**
 * Parses a duration with its unit (`500ms`, `20s`, `1.5m`, `1h`) into milliseconds. A bare number
 * is refused: `--duration 60` would be ambiguous (the services refuse a bare number too).
 * @throws ChaosUsageError on anything else, or outside [minMs, maxMs]
 */
export function parseDuration(text: string, flag = "--duration", minMs = 1000, maxMs = 24 * 3_600_000): number {
  const m = /^(\d+(?:\.\d+)?)\s*(ms|s|m|h)$/.exec(text.trim());
  if (m === null) {
    const hint = /^\d+(\.\d+)?$/.test(text.trim()) ? ` (with a unit: ${text.trim()}s?)` : "";
    throw new ChaosUsageError(`${flag} must be a duration with a unit, e.g. 500ms, 30s, 2m; got "${text}"${hint}`);
  }
  const ms = Math.round(Number(m[1]) * UNITS[m[2]!]!);
  if (ms < minMs || ms > maxMs) throw new ChaosUsageError(`${flag} must be between ${minMs} ms and ${maxMs} ms; got ${ms} ms`);
  return ms;
}

/** Largest seed: seeds are taken modulo 2^32 by the PRNG, so they are kept to unsigned 32-bit. */
export const MAX_SEED = 0xffff_ffff;

/**
 * Parses one seed (`--seed 7`) or a list of seeds (`--seeds 1..50`, `--seeds 3,5,9`, `--seeds
 * 1..3,10`): non-negative integers up to {@link MAX_SEED}, in the order given.
 * @throws ChaosUsageError on anything else, a range going down, or more than 10,000 seeds
 */
export function parseSeeds(text: string, flag = "--seeds"): number[] {
  const out: number[] = [];
  const seed = (s: string): number => {
    if (!/^\d+$/.test(s) || Number(s) > MAX_SEED) throw new ChaosUsageError(`${flag}: "${s}" is not a seed (an integer 0..${MAX_SEED})`);
    return Number(s);
  };
  for (const part of text.split(",").map((s) => s.trim())) {
    const range = /^(\S+?)\s*\.\.\s*(\S+)$/.exec(part);
    if (range === null) {
      out.push(seed(part));
      continue;
    }
    const [a, b] = [seed(range[1]!), seed(range[2]!)];
    if (b < a) throw new ChaosUsageError(`${flag}: the range ${a}..${b} goes down`);
    if (b - a + out.length >= 10_000) throw new ChaosUsageError(`${flag}: more than 10,000 seeds`);
    for (let s = a; s <= b; s++) out.push(s);
  }
  return out;
}

/** Most characters of a client-supplied string an error message repeats (DESIGN §8). */
export const MAX_QUOTED_CHARS = 64;

/** Longest status message sent to a caller, in characters: longer ones are cut (DESIGN §8). */
export const MAX_STATUS_MESSAGE_CHARS = 1024;

/**
 * A client-supplied string as an error message quotes it: in double quotes (JSON escaping, so
 * control characters cannot forge log lines), at most its first {@link MAX_QUOTED_CHARS}
 * characters, and, when cut, how long it was. DESIGN §8: "a message quotes at most a short prefix
 * of what it was given" — a 50 KB name echoed back in a status message stalled the caller's whole
 * HTTP/2 connection (issue 14).
 *
 * @example
 * quote("vm-1")            // "\"vm-1\""
 * quote("x".repeat(50000)) // "\"xxx…x\"… (50000 characters)"
 */
export function quote(value: string, max = MAX_QUOTED_CHARS): string {
  if (value.length <= max) return JSON.stringify(value);
  // Cut on a code point, not inside a surrogate pair.
  let end = max;
  const last = value.charCodeAt(end - 1);
  if (last >= 0xd800 && last <= 0xdbff) end--;
  return `${JSON.stringify(value.slice(0, end))}… (${value.length} characters)`;
}

/**
 * A status message bounded to {@link MAX_STATUS_MESSAGE_CHARS}: the one cap applied to every
 * message on the wire (toGrpcStatus), whatever a handler built.
 */
export function boundMessage(message: string, max = MAX_STATUS_MESSAGE_CHARS): string {
  if (message.length <= max) return message;
  const suffix = `… (message cut at ${max} of ${message.length} characters)`;
  return message.slice(0, Math.max(0, max - suffix.length)) + suffix;
}

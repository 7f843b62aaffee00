import type { CaseResult } from "./runner.js";

const escape = (s: string): string =>
  s
    .replace(/&/g, "&amp;")
    .replace(/</g, "&lt;")
    .replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;")
    // Characters XML 1.0 cannot carry at all.
    // eslint-disable-next-line no-control-regex
    .replace(/[\u0000-\u0008\u000b\u000c\u000e-\u001f]/g, "?");

/**
 * JUnit XML of a conformance run (the format CI systems read): one `<testsuite>` named after the
 * role, one `<testcase>` per clause with its id as the name and the statement in `<system-out>`;
 * a failure carries expected vs. got, a skip why.
 */
export function toJUnitXml(suite: string, target: string, results: readonly CaseResult[], totalMs: number): string {
  const failed = results.filter((r) => r.outcome === "fail").length;
  const skipped = results.filter((r) => r.outcome === "skip").length;
  const cases = results.map((r) => {
    const open = `    <testcase classname="${escape(suite)}" name="${escape(r.id)}" time="${(r.ms / 1000).toFixed(3)}">`;
    const body: string[] = [];
    if (r.outcome === "fail") {
      const text = r.expected !== undefined ? `expected: ${r.expected}\ngot: ${r.got ?? ""}` : (r.message ?? "");
      body.push(`      <failure message="${escape(r.message ?? "failed")}" type="ClauseFailure">${escape(`${text}\nclause source: ${r.source}`)}</failure>`);
    } else if (r.outcome === "skip") {
      body.push(`      <skipped message="${escape(r.message ?? "")}"/>`);
    }
    body.push(`      <system-out>${escape(r.statement)}</system-out>`);
    return [open, ...body, "    </testcase>"].join("\n");
  });
  return [
    '<?xml version="1.0" encoding="UTF-8"?>',
    `<testsuites name="ioasid-fabric conformance" tests="${results.length}" failures="${failed}" skipped="${skipped}" time="${(totalMs / 1000).toFixed(3)}">`,
    `  <testsuite name="${escape(suite)}" hostname="${escape(target)}" tests="${results.length}" failures="${failed}" errors="0" skipped="${skipped}" time="${(totalMs / 1000).toFixed(3)}">`,
    ...cases,
    "  </testsuite>",
    "</testsuites>",
    "",
  ].join("\n");
}

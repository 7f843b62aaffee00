/**
 * Breaks `text` into lines of at most `width` characters: at spaces where it can, inside a word
 * only when the word alone is longer than a line (a 40-character mdev UUID in a 21-character
 * column), then after a `_`, `-`, `.`, `/`, `+`, `,` or `:` if one is near the end of the line
 * (`ioasid_register_` / `notifier_mm()`). Leading and repeated spaces are not kept; an empty text
 * is one empty line.
 * @param width characters per line, at least 1
 */
export function wrapText(text: string, width: number): string[] {
  if (width < 1) throw new RangeError(`wrap width must be at least 1, got ${width}`);
  const lines: string[] = [];
  let line = "";
  for (const word of text.split(/\s+/).filter((w) => w !== "")) {
    let rest = word;
    if (line !== "" && line.length + 1 + rest.length <= width) {
      line += ` ${rest}`;
      continue;
    }
    if (line !== "") lines.push(line);
    while (rest.length > width) {
      const cut = breakPoint(rest, width);
      lines.push(rest.slice(0, cut));
      rest = rest.slice(cut);
    }
    line = rest;
  }
  lines.push(line);
  return lines;
}

/** Where to cut a word longer than `width`: after the last separator in its second half, else at `width`. */
function breakPoint(word: string, width: number): number {
  for (let i = width - 1; i >= Math.ceil(width / 2); i--) if ("_-./+,:".includes(word[i]!)) return i + 1;
  return width;
}

// Locates the buf binary. buf ships per-platform npm packages; this registry serves the Linux
// ones, which are optional dependencies (npm ci skips the one that does not fit this machine).
import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";

const require = createRequire(import.meta.url);
const arch = { x64: "x64", arm64: "aarch64" }[process.arch];

/** Absolute path of the buf binary, or "buf" (from PATH) when no platform package is installed. */
export function bufPath() {
  if (process.platform === "linux" && arch !== undefined) {
    try {
      const pkg = dirname(require.resolve(`@bufbuild/buf-linux-${arch}/package.json`));
      const bin = join(pkg, "bin", "buf");
      if (existsSync(bin)) return bin;
    } catch {
      // not installed: fall through to PATH
    }
  }
  return "buf";
}

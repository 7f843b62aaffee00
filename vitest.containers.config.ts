import { defineConfig } from "vitest/config";

// The container tests (test/containers), apart from `npm test`: they need a Docker engine and the
// compose stack that scripts/test-containers.sh (`npm run test:containers`) builds and starts.
const conditions = ["source", "node", "import", "default"];

export default defineConfig({
  resolve: { conditions },
  ssr: { resolve: { conditions, externalConditions: conditions } },
  test: {
    name: "containers",
    include: ["test/containers/**/*.test.ts"],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // One at a time: one test kills a container of the shared stack.
    fileParallelism: false,
  },
});

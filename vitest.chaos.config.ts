import { defineConfig } from "vitest/config";

// The bounded chaos suite (test/chaos), run by `npm test` after the projects of vitest.config.ts
// (and alone by `npm run test:chaos`): each seed starts a stack of its own, drives guests and
// injects faults for tens of seconds. `npm run chaos` is the longer soak.
const conditions = ["source", "node", "import", "default"];

export default defineConfig({
  resolve: { conditions },
  ssr: { resolve: { conditions, externalConditions: conditions } },
  test: {
    name: "chaos",
    include: ["test/chaos/**/*.test.ts"],
    testTimeout: 240_000,
    hookTimeout: 60_000,
    // One stack at a time: the machine has two cores, and timing is part of what is tested.
    fileParallelism: false,
  },
});

import { defineConfig } from "vitest/config";

// Workspaces export "source" → src/index.ts, so tests run against the sources; services started as
// processes by the testkit run their built dist/ (`npm test` runs `tsc -b` first).
const conditions = ["source", "node", "import", "default"];

export default defineConfig({
  resolve: { conditions },
  ssr: { resolve: { conditions, externalConditions: conditions } },
  test: {
    projects: [
      {
        extends: true,
        test: {
          name: "unit",
          include: ["packages/*/src/**/*.test.ts", "services/*/src/**/*.test.ts", "bench/**/*.test.mjs"],
        },
      },
      {
        extends: true,
        test: {
          name: "integration",
          include: ["test/integration/**/*.test.ts", "test/e2e/**/*.test.ts", "test/contract/**/*.test.ts"],
          testTimeout: 60_000,
          hookTimeout: 60_000,
        },
      },
      {
        extends: true,
        test: {
          // Security between roles (DESIGN §11): each attack of issue 14 repeated against a real stack.
          name: "security",
          include: ["test/security/**/*.test.ts"],
          testTimeout: 120_000,
          hookTimeout: 120_000,
        },
      },
      {
        extends: true,
        test: {
          // The conformance kit against our roles and their broken variants: each case brings up a stack.
          name: "conform",
          include: ["test/conform/**/*.test.ts"],
          testTimeout: 180_000,
          hookTimeout: 60_000,
        },
      },
    ],
  },
});

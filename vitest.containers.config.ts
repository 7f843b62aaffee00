import { defineConfig } from "vitest/config";

// The container tests (test/containers), apart from `npm test`: they need a Docker engine and the
// compose stack that scripts/test-containers.sh (`npm run test:containers`) builds and starts.
const conditions = ["source", "node", "import", "default"];
// Two legs, each against a stack of its own: IOASID_CT_CLUSTER=1 runs the `cluster` profile's
// file alone (three nats-servers), otherwise every other file (one nats-server).
const cluster = process.env["IOASID_CT_CLUSTER"] === "1";
const clusterFile = "test/containers/compose-cluster.test.ts";

export default defineConfig({
  resolve: { conditions },
  ssr: { resolve: { conditions, externalConditions: conditions } },
  test: {
    name: "containers",
    include: cluster ? [clusterFile] : ["test/containers/**/*.test.ts"],
    exclude: cluster ? [] : [clusterFile, "**/node_modules/**"],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // One at a time: one test kills a container of the shared stack.
    fileParallelism: false,
  },
});

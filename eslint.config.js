// @ts-check
import js from "@eslint/js";
import tseslint from "typescript-eslint";

export default tseslint.config(
  { ignores: ["**/dist/**", "**/node_modules/**", "packages/proto/src/gen/**", "**/*.d.ts"] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    rules: {
      "@typescript-eslint/no-unused-vars": ["error", { argsIgnorePattern: "^_", varsIgnorePattern: "^_" }],
      "@typescript-eslint/consistent-type-imports": "error",
      // The width prettier formats to (.prettierrc.json); what prettier cannot break — a long
      // string, template or URL — may run past it, a comment may not.
      "max-len": ["error", { code: 160, ignoreStrings: true, ignoreTemplateLiterals: true, ignoreRegExpLiterals: true, ignoreUrls: true }],
      // Only a workspace's index is imported from elsewhere (STYLE.md "Layout and boundaries").
      "no-restricted-imports": ["error", { patterns: ["@ioasid/*/src/*", "@ioasid/*/dist/*"] }],
    },
  },
  {
    // Type-aware rules, over every TypeScript file of the workspaces and tests (each belongs to a
    // tsconfig project; the project service finds it).
    files: ["packages/**/*.ts", "services/**/*.ts", "test/**/*.ts"],
    languageOptions: { parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname } },
    rules: {
      // A promise nobody awaits, returns or hands to `void` on purpose loses its rejection: in a
      // role, a failed store write or core call that nobody sees (DESIGN §4: durable before acked).
      "@typescript-eslint/no-floating-promises": "error",
      // A switch over a closed set (a oneof case, an event type, a history action) handles every
      // member: a member added to the contract is a compile-time list of places to visit.
      "@typescript-eslint/switch-exhaustiveness-check": ["error", { considerDefaultExhaustiveForUnions: true, requireDefaultForNonUnion: false }],
    },
  },
  {
    // Domain code models the hardware and the IOASID rules; it knows no transport (DESIGN §2: "no
    // proto, no gRPC, no NATS"). The adapters translate.
    files: ["packages/ioasid/src/**/*.ts", "services/*/src/domain/**/*.ts"],
    rules: {
      "no-restricted-imports": [
        "error",
        {
          patterns: [
            { group: ["@ioasid/*/src/*", "@ioasid/*/dist/*"], message: "import a workspace by its index only" },
            { group: ["@ioasid/proto", "@ioasid/proto/*"], message: "domain code knows no proto: convert in an adapter" },
            { group: ["@grpc/*"], message: "domain code knows no gRPC: the gRPC service is an adapter" },
            { group: ["@nats-io/*"], message: "domain code knows no NATS: the bus handler and the store are adapters" },
            // Ports and their types (CorePort, RoleStatePort, HistorySink) are how domain code
            // reaches the outside; the implementations stay in adapters.
            { group: ["@ioasid/bus", "@ioasid/grpc-kit"], allowTypeImports: true, message: "domain code knows no transport: take a port (type imports only)" },
            // From role-kit, domain code may take what does no I/O of its own: KeyedMutex (a per-key
            // lock) and the functions over a CorePort it is given (ensureRegistration, heldReferences).
            {
              group: ["@ioasid/role-kit"],
              allowTypeImports: true,
              allowImportNames: ["KeyedMutex", "ensureRegistration", "heldReferences"],
              message: "domain code knows no transport: take a port (type imports only; KeyedMutex, ensureRegistration, heldReferences are allowed)",
            },
          ],
        },
      ],
    },
  },
  {
    files: ["**/*.mjs", "scripts/**", "bench/**/*.mjs"],
    languageOptions: {
      globals: {
        process: "readonly",
        console: "readonly",
        URL: "readonly",
        Buffer: "readonly",
        AbortController: "readonly",
        setTimeout: "readonly",
        setImmediate: "readonly",
        performance: "readonly",
      },
    },
  },
);

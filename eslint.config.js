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
      // Only a workspace's index is imported from elsewhere (STYLE.md "Layout and boundaries").
      "no-restricted-imports": ["error", { patterns: ["@ioasid/*/src/*", "@ioasid/*/dist/*"] }],
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

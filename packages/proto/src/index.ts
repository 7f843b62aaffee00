/**
 * The generated contracts of ioasid-fabric (ts-proto output of proto/, never edited by hand), one
 * namespace per proto package: `testing` is ioasid.testing.v1, and so on.
 */
export * as testing from "./gen/ioasid/testing/v1/echo.js";
export { descriptorSetPath } from "./descriptors.js";

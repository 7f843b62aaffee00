export { Code, codeName, DomainError, isDomainError, ERROR_DOMAIN, INTERNAL_REASON } from "./domain-error.js";

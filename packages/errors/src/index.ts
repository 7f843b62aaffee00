export { Code, codeName, DomainError, invalidField, isDomainError, reasonError, ERROR_DOMAIN, INTERNAL_REASON } from "./domain-error.js";

export { Code, codeName, DomainError, invalidField, isDomainError, reasonError, ERROR_DOMAIN, INTERNAL_REASON } from "./domain-error.js";
export { boundMessage, quote, MAX_QUOTED_CHARS, MAX_STATUS_MESSAGE_CHARS } from "./quote.js";

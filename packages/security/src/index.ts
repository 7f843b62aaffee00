// Security between roles (DESIGN §11): the credentials a stack generates for each role instance
// and the rules the broker and the services enforce with them.
export {
  inboxPrefix,
  natsPermissions,
  NATS_ROLES,
  OP_LOG_STREAM,
  STREAM_ADMIN_SUBJECTS,
  type NatsIdentity,
  type NatsPermissions,
  type NatsRole,
} from "./nats-permissions.js";
export {
  createNatsCredential,
  NATS_CREDENTIAL_FILE,
  natsConnectOptions,
  natsUserEntry,
  readNatsCredential,
  renderAuthorization,
  writeNatsCredential,
  type NatsCredential,
  type NatsUserEntry,
} from "./nats-credentials.js";

// Security between roles (DESIGN §11): the credentials a stack generates for each role instance
// and the rules the broker and the services enforce with them.
export {
  assertRoleIdentity,
  formatIdentity,
  fromIdentityUri,
  identityFromSubjectAltName,
  INSTANCE_PATTERN,
  isRole,
  isRoleIdentity,
  Role,
  ROLES,
  toIdentityUri,
  TRUST_DOMAIN,
  type RoleIdentity,
} from "./identity.js";
export {
  CA_FILES,
  CA_VALIDITY_DAYS,
  CERT_VALIDITY_DAYS,
  chainProblem,
  createStackCa,
  CREDENTIAL_FILES,
  issueCertificate,
  readInstanceCredentials,
  readStackCa,
  writeInstanceCredentials,
  writeStackCa,
  type CreateStackCaOptions,
  type InstanceCredentials,
  type IssueCertificateOptions,
  type IssuedCertificate,
  type StackCa,
} from "./pki.js";

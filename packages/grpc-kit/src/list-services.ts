import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { loadSync } from "@grpc/proto-loader";
import type { AnyServiceDefinition } from "./adapt-service.js";
import { createClient } from "./create-client.js";

let definition: AnyServiceDefinition | undefined;

/** The gRPC server reflection v1 service, loaded from the .proto that @grpc/reflection ships. */
function reflectionDefinition(): AnyServiceDefinition {
  if (definition === undefined) {
    const pkg = dirname(createRequire(import.meta.url).resolve("@grpc/reflection/package.json"));
    const defs = loadSync(join(pkg, "build/proto/grpc/reflection/v1/reflection.proto"), { keepCase: true });
    definition = defs["grpc.reflection.v1.ServerReflection"] as AnyServiceDefinition;
  }
  return definition;
}

interface ReflectionCall {
  send(message: unknown): Promise<void>;
  end(): void;
  readonly responses: AsyncIterable<{ list_services_response?: { service: { name: string }[] } }>;
}

/**
 * The fully qualified names of the services a server offers, asked through gRPC server reflection
 * (what `grpcurl list` shows).
 * @throws DomainError UNAVAILABLE when nothing answers at `address`
 */
export async function listServices(address: string, deadlineMs = 5000): Promise<string[]> {
  const reflection = createClient(reflectionDefinition(), address, { streamDeadlineMs: deadlineMs });
  try {
    const call = (reflection["ServerReflectionInfo"] as unknown as () => ReflectionCall)();
    await call.send({ host: "", list_services: "" });
    call.end();
    const names: string[] = [];
    for await (const response of call.responses) {
      for (const s of response.list_services_response?.service ?? []) names.push(s.name);
    }
    return names.sort();
  } finally {
    reflection.close();
  }
}

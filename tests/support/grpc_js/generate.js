// Streams one Generate call through pdserve.v1.Gateway, the service loaded from protos/ at run time, as any
// grpc-js client would; prints the messages it received as JSON lines (token ids, text, finish reason).
//   node generate.js PROTOS_DIR ADDRESS REQUEST_JSON
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");

const [protosDir, address, requestJson] = process.argv.slice(2);
const definition = loader.loadSync("pdserve/v1/gateway.proto",
  { includeDirs: [protosDir], keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true });
const Gateway = grpc.loadPackageDefinition(definition).pdserve.v1.Gateway;
const client = new Gateway(address, grpc.credentials.createInsecure());
const call = client.Generate(JSON.parse(requestJson), { deadline: Date.now() + 120000 });
call.on("data", (reply) => console.log(JSON.stringify(
  { token_ids: reply.token_ids, text: reply.text, finish_reason: reply.finish_reason })));
call.on("error", (error) => { console.error(`${error.code}: ${error.details}`); process.exit(1); });
call.on("end", () => client.close());

// whoami: the AWS SDK for JavaScript v3's default credential chain (what a client given no
// credentials builds for itself), then STS GetCallerIdentity, as a Node service in a pod would do
// it. podiam's SDK matrix runs it inside pods.
//
// Usage: node whoami.mjs [seconds]. With seconds > 0 it calls GetCallerIdentity once a second
// for that long, so the SDK's credential cache has to refresh through the metadata service.
// Each call prints one JSON line; any failed call makes the exit code 1.
import { STSClient, GetCallerIdentityCommand } from "@aws-sdk/client-sts";

const seconds = Number(process.argv[2] ?? 0);
const client = new STSClient({});
// The client's own resolved (memoized) provider: each line shows the key the call signs with.
const credentials = client.config.credentials;
const deadline = Date.now() + seconds * 1000;
let failed = false;

for (;;) {
  const line = {};
  try {
    const creds = await credentials();
    line.access_key_id = creds.accessKeyId;
    line.access_key_id_prefix = creds.accessKeyId.slice(0, 4);
    if (creds.expiration) line.expiration = creds.expiration.toISOString();
    const out = await client.send(new GetCallerIdentityCommand({}));
    line.arn = out.Arn;
  } catch (error) {
    line.error = `${error.name}: ${error.message}`;
  }
  failed ||= "error" in line;
  console.log(JSON.stringify(line));
  if (Date.now() >= deadline) break;
  await new Promise((resolve) => setTimeout(resolve, 1000));
}
process.exit(failed ? 1 : 0);

// Run inside a simulated pod: the AWS SDK for JavaScript v3's default credential chain
// (here: the instance metadata service, which interceptor answers), then STS
// GetCallerIdentity against the test's STS. Prints the caller ARN or "ERROR: <reason>".
const { STSClient, GetCallerIdentityCommand } = require("@aws-sdk/client-sts");
const { fromNodeProviderChain } = require("@aws-sdk/credential-providers");

async function main() {
  const client = new STSClient({
    region: "us-east-1",
    endpoint: process.argv[2],
    credentials: fromNodeProviderChain(),
  });
  try {
    const identity = await client.send(new GetCallerIdentityCommand({}));
    console.log(identity.Arn);
  } catch (error) {
    console.log(`ERROR: ${error.name}: ${error.message}`);
    process.exitCode = 1;
  }
}

main();

"""Run inside a simulated pod: boto3's default credential chain (here: the instance
metadata service at 169.254.169.254, which interceptor answers), then STS
GetCallerIdentity against the test's STS. Prints the caller ARN, or ERROR: <reason>.
With --credentials after the endpoint, the ARN is followed by the AccessKeyId, secret key
and session token the SDK received (tests compare them with what the agent logged)."""
import sys

import boto3
import botocore.exceptions


def main() -> int:
    endpoint = sys.argv[1]
    try:
        session = boto3.session.Session(region_name="us-east-1")
        identity = session.client("sts", endpoint_url=endpoint).get_caller_identity()
    except botocore.exceptions.BotoCoreError as error:
        print(f"ERROR: {type(error).__name__}: {error}")
        return 1
    except botocore.exceptions.ClientError as error:
        print(f"ERROR: {error}")
        return 1
    if sys.argv[2:] == ["--credentials"]:
        held = session.get_credentials().get_frozen_credentials()
        print(identity["Arn"], held.access_key, held.secret_key, held.token)
    else:
        print(identity["Arn"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

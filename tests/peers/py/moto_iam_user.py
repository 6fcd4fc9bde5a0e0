"""Creates, in a moto server started with INITIAL_NO_AUTH_ACTION_COUNT=3, an IAM user that
may assume only the roles named on the command line, and prints its access key as JSON.
The three calls here are the unauthenticated ones; moto checks every later call against
the caller's IAM policy, so assuming any other role is refused with AccessDenied."""
import json
import sys

import boto3


def main() -> None:
    endpoint, account, roles = sys.argv[1], sys.argv[2], sys.argv[3:]
    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="AKIASETUP00000000000",
        aws_secret_access_key="setup",
    )
    iam.create_user(UserName="node")
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": "sts:AssumeRole",
                "Resource": [f"arn:aws:iam::{account}:role/{role}" for role in roles],
            }
        ],
    }
    iam.put_user_policy(UserName="node", PolicyName="assume", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="node")["AccessKey"]
    print(json.dumps({"id": key["AccessKeyId"], "secret": key["SecretAccessKey"]}))


if __name__ == "__main__":
    main()

"""Run inside a pod: ask the metadata service for credentials (IMDSv2) in a loop for
SECONDS seconds; print one line per attempt: `ok <AccessKeyId> <role>` or `fail <reason>`."""
import http.client
import json
import sys
import time


def attempt() -> str:
    try:
        c = http.client.HTTPConnection("169.254.169.254", 80, timeout=1)
        c.request("PUT", "/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        r = c.getresponse()
        token = r.read().decode()
        if r.status != 200:
            return f"fail token {r.status}"
        h = {"X-aws-ec2-metadata-token": token}
        c.request("GET", "/latest/meta-data/iam/security-credentials/", headers=h)
        r = c.getresponse()
        role = r.read().decode().strip()
        if r.status != 200:
            return f"fail list {r.status}"
        c.request("GET", f"/latest/meta-data/iam/security-credentials/{role}", headers=h)
        r = c.getresponse()
        body = r.read().decode()
        if r.status != 200:
            return f"fail creds {r.status}"
        return f"ok {json.loads(body)['AccessKeyId']} {role}"
    except (OSError, ValueError, KeyError) as error:
        return f"fail {type(error).__name__}"


def main() -> None:
    deadline = time.monotonic() + float(sys.argv[1])
    while time.monotonic() < deadline:
        print(attempt(), flush=True)
        time.sleep(0.05)


if __name__ == "__main__":
    main()

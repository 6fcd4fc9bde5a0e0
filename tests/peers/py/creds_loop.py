"""Run inside a pod: ask the metadata service for credentials (IMDSv2) in a loop for
SECONDS seconds, or without an argument until stdin closes; print one line per attempt:
- `ok <AccessKeyId> <role>`: served;
- `refused <error>`: the connection was refused or ended without an answer;
- `status <step> <code>`: an HTTP answer other than 200;
- `fail <error>`: anything else (a timeout, a malformed answer)."""
import http.client
import json
import sys
import threading
import time

ENDED = (ConnectionRefusedError, ConnectionResetError, BrokenPipeError,
         http.client.RemoteDisconnected)


def attempt() -> str:
    try:
        c = http.client.HTTPConnection("169.254.169.254", 80, timeout=2)
        c.request("PUT", "/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        r = c.getresponse()
        token = r.read().decode()
        if r.status != 200:
            return f"status token {r.status}"
        h = {"X-aws-ec2-metadata-token": token}
        c.request("GET", "/latest/meta-data/iam/security-credentials/", headers=h)
        r = c.getresponse()
        role = r.read().decode().strip()
        if r.status != 200:
            return f"status list {r.status}"
        c.request("GET", f"/latest/meta-data/iam/security-credentials/{role}", headers=h)
        r = c.getresponse()
        body = r.read().decode()
        if r.status != 200:
            return f"status creds {r.status}"
        return f"ok {json.loads(body)['AccessKeyId']} {role}"
    except ENDED as error:
        return f"refused {type(error).__name__}"
    except (OSError, ValueError, KeyError) as error:
        return f"fail {type(error).__name__}"


def main() -> None:
    stop = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()
        stop.set()

    if len(sys.argv) > 1:
        threading.Timer(float(sys.argv[1]), stop.set).start()
    else:
        threading.Thread(target=watch_stdin, daemon=True).start()
    while not stop.is_set():
        print(attempt(), flush=True)
        # Pacing, not synchronisation: the test waits on the lines themselves.
        stop.wait(0.02)


if __name__ == "__main__":
    main()

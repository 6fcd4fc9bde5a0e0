"""Run inside a pod: ask the metadata service for credentials (IMDSv2) in a loop for
SECONDS seconds, or without an argument until stdin closes. By default each attempt opens
a connection and fetches a token, as botocore does; with `--keep-alive` one connection
and one token serve every attempt, as SDKs that pool connections and cache the token do
(http.client reconnects by itself after an answer with `Connection: close`, and the
token is kept). Print one line per attempt:
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


class Session:
    """The connection and token kept between attempts with --keep-alive."""
    def __init__(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive
        self.conn = None
        self.token = None


def attempt(session: Session) -> str:
    try:
        if session.conn is None or not session.keep_alive:
            session.conn = http.client.HTTPConnection("169.254.169.254", 80, timeout=2)
        c = session.conn
        if session.token is None or not session.keep_alive:
            c.request("PUT", "/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
            r = c.getresponse()
            token = r.read().decode()
            if r.status != 200:
                return f"status token {r.status}"
            session.token = token
        h = {"X-aws-ec2-metadata-token": session.token}
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
        session.conn = None
        return f"refused {type(error).__name__}"
    except (OSError, ValueError, KeyError) as error:
        session.conn = None
        return f"fail {type(error).__name__}"


def main() -> None:
    stop = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()
        stop.set()

    args = [arg for arg in sys.argv[1:] if arg != "--keep-alive"]
    session = Session("--keep-alive" in sys.argv[1:])
    if args:
        threading.Timer(float(args[0]), stop.set).start()
    else:
        threading.Thread(target=watch_stdin, daemon=True).start()
    while not stop.is_set():
        print(attempt(session), flush=True)
        # Pacing, not synchronisation: the test waits on the lines themselves.
        stop.wait(0.02)


if __name__ == "__main__":
    main()

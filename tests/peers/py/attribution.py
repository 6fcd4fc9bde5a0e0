"""Run inside a pod: connections to the metadata address that a test holds open or
floods, to probe their kernel attribution (single requests go through pod_client.py).

  hold                          connect to the metadata address, send a credential listing,
                                print `sent`, then wait for the answer: `<status> <body>`
  flood N                       open N connections to the metadata address without waiting
                                for them; print how many connects the kernel took
"""
import errno
import http.client
import resource
import socket
import sys

LISTING = b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n"


def answer(sock: socket.socket) -> str:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return f"{response.status} {response.read().decode(errors='replace').strip()}"


def hold() -> None:
    # Long enough for the floods the test may need before it resumes the agent.
    sock = socket.create_connection(("169.254.169.254", 80), timeout=300)
    sock.sendall(LISTING)
    print("sent", flush=True)
    try:
        print(answer(sock), flush=True)
    except OSError as error:
        print(f"fail {type(error).__name__}", flush=True)


def flood(count: str) -> None:
    wanted = int(count)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks, taken = [], 0
    for _ in range(wanted):
        sock = socket.socket()
        sock.setblocking(False)
        code = sock.connect_ex(("169.254.169.254", 80))
        if code in (0, errno.EINPROGRESS):
            taken += 1
        socks.append(sock)
    print(taken, flush=True)
    for sock in socks:
        sock.close()


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    {"hold": hold, "flood": flood}[command](*args)

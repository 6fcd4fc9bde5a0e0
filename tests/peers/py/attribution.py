"""Run inside a pod: clients that probe the kernel attribution of metadata connections.

  from-port PORT HOST HOSTPORT  connect from source port PORT (to HOST:HOSTPORT), list the
                                credential roles; print `<status> <body>` or `fail <error>`
  hold                          connect to the metadata address, send a credential listing,
                                print `sent`, then wait for the answer: `<status> <body>`
  flood N                       open N connections to the metadata address without waiting
                                for them; print how many connects the kernel took
  churn PARK LIST               for each cgroup.procs path in the file LIST: move into that
                                cgroup, list the credential roles, print
                                `<path> <status> <body>`; then move into PARK
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


def from_port(port: str, host: str, host_port: str) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.settimeout(5)
    try:
        sock.bind(("0.0.0.0", int(port)))
        sock.connect((host, int(host_port)))
        sock.sendall(LISTING)
        print(answer(sock), flush=True)
    except OSError as error:
        print(f"fail {errno.errorcode.get(error.errno, type(error).__name__)}", flush=True)


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


def churn(park: str, listing: str) -> None:
    with open(listing) as paths:
        for path in (line.strip() for line in paths if line.strip()):
            with open(path, "w") as procs:
                procs.write("0")
            try:
                sock = socket.create_connection(("169.254.169.254", 80), timeout=5)
                sock.sendall(LISTING)
                print(f"{path} {answer(sock)}", flush=True)
                sock.close()
            except OSError as error:
                print(f"{path} fail {type(error).__name__}", flush=True)
    with open(park, "w") as procs:
        procs.write("0")


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    {"from-port": from_port, "hold": hold, "flood": flood, "churn": churn}[command](*args)

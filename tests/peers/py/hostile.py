"""Hostile clients of the metadata address, run inside a pod, that hold their connections
longer than one request (raw requests go through pod_client.py). Each mode prints one
JSON object on stdout.

  silent WAIT            connect, send nothing: {"closed": bool} within WAIT s
  drip WAIT              send a valid request head one byte a second:
                         {"closed": bool, "sent": bytes sent, "data": what came back}
  idle WAIT              one request on a keep-alive connection, then nothing:
                         {"status_line": ..., "closed": bool} within WAIT s
  unread COUNT WAIT PATH COUNT pipelined GETs of PATH, answers never read; after WAIT s,
                         {"closed": bool} (the server gave up on the connection)
  flood COUNT HOLD       open COUNT connections at once and keep them HOLD s:
                         {"opened", "failed", "closed_by_server"}
"""
import json
import resource
import select
import socket
import sys
import time

from pod_client import read_until_closed

ADDRESS = ("169.254.169.254", 80)
TCP_ESTABLISHED = 1
HEAD = (
    b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\n"
    b"Host: 169.254.169.254\r\n\r\n"
)


def connect(timeout: float = 3.0) -> socket.socket:
    return socket.create_connection(ADDRESS, timeout=timeout)


def silent(wait: float) -> dict:
    sock = connect()
    _, closed = read_until_closed(sock, wait)
    return {"closed": closed}


def drip(wait: float) -> dict:
    sock = connect()
    deadline = time.monotonic() + wait
    sent = 0
    for byte in HEAD:
        if time.monotonic() > deadline:
            break
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return {"closed": True, "sent": sent, "data": ""}
        sent += 1
        ready, _, _ = select.select([sock], [], [], 1.0)
        if ready:
            data, closed = read_until_closed(sock, 0.5)
            if closed:
                return {"closed": True, "sent": sent, "data": data.decode(errors="replace")}
    return {"closed": False, "sent": sent, "data": ""}


def idle(wait: float) -> dict:
    sock = connect()
    sock.sendall(HEAD)
    # The answer is small: one read holds the head and body; then the connection idles.
    sock.settimeout(3)
    first = sock.recv(65536)
    _, closed = read_until_closed(sock, wait)
    return {"status_line": first.split(b"\r\n", 1)[0].decode(errors="replace"), "closed": closed}


def unread(count: int, wait: float, path: str) -> dict:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A small receive window, so the server's answers back up soon.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(3)
    sock.connect(ADDRESS)
    sock.setblocking(False)
    pending = f"GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n".encode() * count
    deadline = time.monotonic() + wait
    # Send what the server takes, never read; the server stops reading once its answers
    # back up.
    while pending and time.monotonic() < deadline:
        _, writable, _ = select.select([], [sock], [], 0.2)
        if writable:
            try:
                pending = pending[sock.send(pending):]
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                return {"closed": True}
    time.sleep(max(0.0, deadline - time.monotonic()))
    # Reading now would unblock the server: look at the connection's state instead. A
    # server that gave up reset it (it had unread requests) or sent its FIN.
    state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    return {"closed": state != TCP_ESTABLISHED, "tcp_state": state, "unsent": len(pending)}


def flood(count: int, hold: float) -> dict:
    resource.setrlimit(resource.RLIMIT_NOFILE, (count + 256, count + 256))
    socks, failed = [], 0
    for _ in range(count):
        try:
            socks.append(connect(timeout=5))
        except OSError:
            failed += 1
    time.sleep(hold)
    closed = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            if sock.recv(1) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        sock.close()
    return {"opened": len(socks), "failed": failed, "closed_by_server": closed}


def main() -> None:
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "silent":
        result = silent(float(args[0]))
    elif mode == "drip":
        result = drip(float(args[0]))
    elif mode == "idle":
        result = idle(float(args[0]))
    elif mode == "unread":
        result = unread(int(args[0]), float(args[1]), args[2])
    elif mode == "flood":
        result = flood(int(args[0]), float(args[1]))
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""A client that stays running inside a pod: the test sends it requests, one JSON object
a line on stdin, and it answers each with one JSON object a line on stdout, until stdin
closes. Started once in the pod's cgroup and network namespace, so every connection it
makes is attributed by the kernel exactly as a per-request process's would be, without
paying Python's start-up for each request.

A request (every field optional):
  method, path, headers   an HTTP request (default GET /; headers as [[name, value], ...])
  bytes, wait             instead, these bytes (hex) sent raw on a new connection, then
                          read until the server closes or WAIT s (default 5) pass
  keep                    send the HTTP request on the connection kept from the last one
                          with keep (opening it if there is none); otherwise on a new
                          connection, closed after the answer
  host, port              where to connect (default the metadata address, 169.254.169.254:80)
  source_port             bind this source port first (SO_REUSEADDR)
  timeout                 seconds for the connect and each read (default 3)
  join                    a cgroup.procs path: move this process into that cgroup first
                          (a request of nothing else only moves it, and answers {})

An answer:
  {"peer", "connection", "status", "headers", "body"}  an HTTP answer; headers lowercased
  {"peer", "connection", "data", "closed"}             what came back for raw bytes
  {"peer"?, "connection"?, "error"}                     the connection failed: the error
      named as Python names it without "Error" (ConnectionRefused, ConnectionReset,
      RemoteDisconnected, BrokenPipe, Timeout) or else the errno's name

`peer` is the address the socket is connected to as the kernel reports it: a connection
the agent's redirect took shows the agent's address, one the redirect missed shows the
metadata address itself (the node's own service). `connection` counts the connections
this client opened, so a test sees which answers shared one."""
import errno
import http.client
import json
import socket
import sys
import time

METADATA = ("169.254.169.254", 80)


class Client:
    def __init__(self) -> None:
        self.opened = 0
        self.kept = None  # (HTTPConnection, connection number, peer)

    def connect(self, request: dict) -> tuple[socket.socket, int, str]:
        host = request.get("host", METADATA[0])
        port = int(request.get("port", METADATA[1]))
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(float(request.get("timeout", 3)))
        try:
            if request.get("source_port"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0",
                           int(request["source_port"])))
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        self.opened += 1
        peer = sock.getpeername()
        return sock, self.opened, f"{peer[0]}:{peer[1]}" if family == socket.AF_INET \
            else f"[{peer[0]}]:{peer[1]}"

    def http(self, request: dict, answer: dict) -> None:
        keep = bool(request.get("keep"))
        if keep and self.kept is not None:
            connection, number, peer = self.kept
        else:
            self.drop_kept()
            sock, number, peer = self.connect(request)
            connection = http.client.HTTPConnection(
                request.get("host", METADATA[0]), timeout=float(request.get("timeout", 3)))
            connection.sock = sock
            if keep:
                self.kept = (connection, number, peer)
        answer.update(peer=peer, connection=number)
        try:
            connection.request(
                request.get("method", "GET"),
                request.get("path", "/"),
                headers=dict(request.get("headers", [])),
            )
            response = connection.getresponse()
            body = response.read().decode(errors="replace")
        except BaseException:
            # A kept connection that failed is not kept.
            if keep:
                self.drop_kept()
            else:
                connection.close()
            raise
        answer.update(
            status=response.status,
            headers={name.lower(): value for name, value in response.getheaders()},
            body=body,
        )
        if not keep:
            connection.close()
        elif response.will_close:
            self.drop_kept()

    def raw(self, request: dict, answer: dict) -> None:
        self.drop_kept()
        sock, number, peer = self.connect(request)
        answer.update(peer=peer, connection=number)
        try:
            try:
                sock.sendall(bytes.fromhex(request["bytes"]))
            except (BrokenPipeError, ConnectionResetError):
                pass
            data, closed = read_until_closed(sock, float(request.get("wait", 5)))
            answer.update(data=data.decode(errors="replace"), closed=closed)
        finally:
            sock.close()

    def drop_kept(self) -> None:
        if self.kept is not None:
            self.kept[0].close()
            self.kept = None

    def answer(self, request: dict) -> dict:
        answer: dict = {}
        try:
            if "join" in request:
                with open(request["join"], "w") as procs:
                    procs.write("0")
                if request.keys() == {"join"}:
                    return answer
            if "bytes" in request:
                self.raw(request, answer)
            else:
                self.http(request, answer)
        except (socket.timeout, TimeoutError):
            answer["error"] = "Timeout"
        except (ConnectionError, http.client.RemoteDisconnected) as error:
            answer["error"] = type(error).__name__.removesuffix("Error")
        except OSError as error:
            answer["error"] = errno.errorcode.get(error.errno, type(error).__name__)
        except http.client.HTTPException as error:
            answer["error"] = type(error).__name__
        return answer


def read_until_closed(sock: socket.socket, wait: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes (True) or `wait` s pass (False)."""
    deadline = time.monotonic() + wait
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return data, False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk


def main() -> None:
    client = Client()
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(client.answer(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()

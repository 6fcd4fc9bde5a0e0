"""One raw HTTP request to the metadata address from inside a pod, for tests of the
metadata API's edges. Usage: imds_http.py METHOD PATH [Header=Value ...]
Prints the status on the first line, then the body; status 0 and the error if the
connection itself failed."""
import http.client
import sys


def main() -> None:
    method, path = sys.argv[1], sys.argv[2]
    headers = dict(arg.split("=", 1) for arg in sys.argv[3:])
    try:
        connection = http.client.HTTPConnection("169.254.169.254", 80, timeout=3)
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        print(response.status)
        print(response.read().decode(errors="replace"))
    except OSError as error:
        print(0)
        print(error)


if __name__ == "__main__":
    main()

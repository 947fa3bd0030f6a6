#!/usr/bin/env python3
"""A backend as a new user would write one: Python's ThreadingHTTPServer.

What makes it realistic, on purpose:
- the accept backlog is 5 (`request_queue_size`, the standard library's
  default), so a burst of new connections overflows the kernel's queue and
  further connects wait for SYN retransmission;
- the handler speaks HTTP/1.0 (BaseHTTPRequestHandler's default), so every
  request arrives on a new connection and goes through that small queue;
- one thread per connection, under the GIL.

It binds 127.0.0.1 on the given port (0: any free one) and, once listening,
writes `{"listen":"127.0.0.1:PORT"}` to --ready-file atomically (tmp + rename),
as the Trellis binaries do. `--delay` makes every answer wait that long first
(a slow instance).

    echo_backend.py --name b1 --ready-file /tmp/b1.json [--port 0] [--delay 0]
"""

import argparse
import json
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Server(ThreadingHTTPServer):
    request_queue_size = 5
    daemon_threads = True


def handler(name, delay):
    body = f"hello from {name}\n".encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if delay > 0:
                time.sleep(delay)
            self.send_response(200)
            self.send_header("content-type", "text/plain")
            self.send_header("content-length", str(len(body)))
            self.send_header("x-backend", name)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            # One stderr line per request would cost more than the answer.
            pass

    return Handler


def write_ready(path, addr):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"listen": addr}, f, separators=(",", ":"))
        f.write("\n")
    os.rename(tmp, path)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", default="backend")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--delay", type=float, default=0.0, help="seconds before every answer")
    p.add_argument("--ready-file", required=True)
    a = p.parse_args()
    server = Server(("127.0.0.1", a.port), handler(a.name, a.delay))
    host, port = server.server_address[:2]
    write_ready(a.ready_file, f"{host}:{port}")
    server.serve_forever()


if __name__ == "__main__":
    main()

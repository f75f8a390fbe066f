"""A minimal OTLP/HTTP trace collector for benchmarks: ``POST /v1/traces``
answered ``200`` with an empty ``ExportTraceServiceResponse`` (the body is
read and counted, not decoded), in its own process so that its CPU is not
the server's.  ``tools/bench.py`` runs it beside the ``ts-otel*`` servers.

    .venv/bin/python tools/otlp_sink.py --port 4318
"""

from __future__ import annotations

import argparse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    received = 0

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        _Sink.received += len(self.rfile.read(length))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return  # quiet: one line per export would be most of its work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args()
    with ThreadingHTTPServer(("127.0.0.1", args.port), _Sink) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()

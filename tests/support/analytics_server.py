#!/usr/bin/env python3
"""The far side of the `http` (analytics API) sink for the fault harness
(scripts/chaos.py): for each POST it appends every NDJSON line of the body to
OUTFILE, flushes it (so a SIGKILL right after the answer loses nothing that
was acknowledged), and only then answers 200. A JSON-array body (sink
`format = "json"`) is written one element a line. A body sent with
`Content-Encoding: gzip` or `zstd` (sink `compression`) is decoded first;
`GET /stats` answers what came in: requests, records, the bytes on the wire
(request bodies as received) and the bytes decoded.

It runs as a process of its own so that the harness can SIGKILL it (connection
refused) or SIGSTOP it (connections open, then hang).

usage: analytics_server.py PORT OUTFILE
"""

import gzip
import http.server
import json
import sys
import threading

try:
    import zstandard
except ImportError:  # only needed for zstd bodies
    zstandard = None


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real API would do
    out = None
    lock = threading.Lock()
    stats = {"requests": 0, "records": 0, "wire_bytes": 0, "body_bytes": 0}

    def _body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    # Trailer lines up to the empty line.
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_POST(self):
        wire = self._body()
        encoding = self.headers.get("Content-Encoding", "identity").lower()
        if encoding == "gzip":
            body = gzip.decompress(wire)
        elif encoding == "zstd":
            body = zstandard.ZstdDecompressor().decompressobj().decompress(wire)
        elif encoding == "identity":
            body = wire
        else:
            self._answer(415, b'{"error":"unsupported Content-Encoding"}')
            return
        decoded = len(body)
        body = body.strip()
        if body.startswith(b"["):
            lines = [json.dumps(r, separators=(",", ":")).encode() for r in json.loads(body)]
        else:
            lines = [line for line in body.splitlines() if line.strip()]
        with Handler.lock:
            for line in lines:
                Handler.out.write(line + b"\n")
            Handler.out.flush()
            st = Handler.stats
            st["requests"] += 1
            st["records"] += len(lines)
            st["wire_bytes"] += len(wire)
            st["body_bytes"] += decoded
        self._answer(200, b'{"ok":true}')

    def do_GET(self):
        if self.path == "/stats":
            with Handler.lock:
                self._answer(200, json.dumps(Handler.stats).encode())
            return
        self._answer(200, b'{"ok":true}')

    def _answer(self, status, payload):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    port, outfile = int(sys.argv[1]), sys.argv[2]
    Handler.out = open(outfile, "ab")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()

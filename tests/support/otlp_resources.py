"""A minimal OTLP/HTTP protobuf trace receiver that shows what oteltap does
not print: the resource of each export. Prints one JSON line per
ResourceSpans: {"path", "content_type", "resource": {key: value}, "spans": [name]}.

usage: otlp_resources.py PORT
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


def value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        for rs in req.resource_spans:
            print(
                json.dumps(
                    {
                        "path": self.path,
                        "content_type": self.headers.get("Content-Type"),
                        "resource": {a.key: value(a.value) for a in rs.resource.attributes},
                        "spans": [s.name for ss in rs.scope_spans for s in ss.spans],
                    }
                ),
                flush=True,
            )
        out = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()

#!/usr/bin/env python3
"""Runs the README's uplink consumers ("Running on a metered link": the
```python blocks that start with `# uplink consumer: KIND`) against real
servers, so the README cannot drift from what the sinks send.

usage:
  readme_consumers.py http PORT OUTFILE
      an HTTP server: each POST is decoded by the README's
      records_from_post; one JSON line per record goes to OUTFILE.
  readme_consumers.py mqtt PORT VERSION COUNT TIMEOUT_S READYFILE
      subscribes to # (MQTT VERSION 5 or 3.1.1), touches READYFILE once
      subscribed, decodes each message with records_from_message and prints
      {"topic", "props", "record"} lines once COUNT distinct idempotency
      keys arrived (or TIMEOUT_S passed).
  readme_consumers.py s3 ENDPOINT BUCKET
      prints {"key", "record"} for every record of every object, decoded
      with records_from_object.
"""

import http.server
import json
import pathlib
import re
import sys
import threading
import time

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def consumer(kind):
    """The namespace of the README block `# uplink consumer: KIND`."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    [code] = [b for b in blocks if b.startswith(f"# uplink consumer: {kind} ")]
    ns = {}
    exec(compile(code, f"README.md ({kind} consumer)", "exec"), ns)
    return ns


def serve_http(port, outfile):
    records_from_post = consumer("http")["records_from_post"]
    out = open(outfile, "ab")
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            records = records_from_post(self.headers, body)
            with lock:
                for r in records:
                    out.write(json.dumps(r).encode() + b"\n")
                out.flush()
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


def subscribe_mqtt(port, version, count, timeout_s, readyfile):
    import paho.mqtt.client as mqtt

    records_from_message = consumer("mqtt")["records_from_message"]
    v5 = version == "5"
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id="readme-consumer",
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
    )
    got, keys, done = [], set(), threading.Event()

    def on_connect(c, userdata, flags, reason, props):
        c.subscribe("#", qos=1)

    def on_subscribe(c, userdata, mid, reasons, props):
        pathlib.Path(readyfile).touch()

    def on_message(c, userdata, msg):
        props = dict(getattr(msg.properties, "UserProperty", None) or [])
        n = len({g["msg"] for g in got})
        for r in records_from_message(msg):
            got.append({"msg": n, "wire": len(msg.payload), "topic": msg.topic, "props": props, "record": r})
            keys.add(r["idempotency_key"])
        if len(keys) >= count:
            done.set()

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    done.wait(timeout_s)
    client.loop_stop()
    for g in got:
        print(json.dumps(g))


def dump_s3(endpoint, bucket):
    import boto3

    records_from_object = consumer("s3")["records_from_object"]
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            for r in records_from_object(obj["Key"], body):
                print(json.dumps({"key": obj["Key"], "record": r}))


def main():
    args = sys.argv[1:]
    if args[:1] == ["http"] and len(args) == 3:
        serve_http(int(args[1]), args[2])
    elif args[:1] == ["mqtt"] and len(args) == 6:
        subscribe_mqtt(int(args[1]), args[2], int(args[3]), float(args[4]), args[5])
    elif args[:1] == ["s3"] and len(args) == 3:
        dump_s3(args[1], args[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()

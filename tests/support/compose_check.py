"""Checks compose/compose.yml without a container engine, and prints one
JSON line per problem found (nothing when it is fine):

- the file validates against the compose-spec JSON schema
  (tests/support/compose-spec.json);
- every bind-mounted host path exists (certs/out is made by `make certs`:
  the checker is given a directory that stands for it);
- every image is pinned to a concrete version (not `latest`, not a bare
  major such as `:2`) and no service has both `build` and `image`;
- every host the gateway configuration points to (MQTT broker, OTLP
  collector, sink URLs) is a service of the file;
- a port is published on every interface only when its line says why
  (a `# device-facing` comment); the rest are bound to 127.0.0.1.

usage: compose_check.py COMPOSE_FILE CERTS_OUT_STANDIN
"""
import json
import os
import re
import sys
import urllib.parse

import jsonschema
import yaml

compose_file, certs_standin = sys.argv[1], sys.argv[2]
here = os.path.dirname(os.path.abspath(compose_file))
text = open(compose_file).read()
doc = yaml.safe_load(text)
problems = []


def problem(kind, detail):
    problems.append({"kind": kind, "detail": detail})


schema = json.load(open(os.path.join(os.path.dirname(__file__), "compose-spec.json")))
for e in jsonschema.Draft201909Validator(schema).iter_errors(doc):
    problem("schema", f"{'/'.join(map(str, e.path))}: {e.message}")

services = doc.get("services", {})
named_volumes = set((doc.get("volumes") or {}).keys())
for name, svc in services.items():
    image = svc.get("image")
    if image and "build" in svc:
        problem("build_and_image", f"{name}: both build and image")
    if image:
        tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else None
        if "@sha256:" not in image and (tag is None or tag == "latest" or re.fullmatch(r"v?\d+", tag)):
            problem("unpinned_image", f"{name}: {image}")
    for v in svc.get("volumes", []):
        source = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
        if source in named_volumes:
            continue
        path = os.path.normpath(os.path.join(here, source))
        if os.path.normpath(os.path.join(here, "../certs/out")) == path or path.startswith(
            os.path.normpath(os.path.join(here, "../certs/out")) + os.sep
        ):
            path = os.path.join(certs_standin, os.path.relpath(path, os.path.join(here, "../certs/out")))
        if not os.path.exists(path):
            problem("missing_mount", f"{name}: {source}")

# Ports: published on all interfaces only with a reason on the line.
for line in text.splitlines():
    m = re.match(r'\s*-\s*"(\d+:\d+)"(.*)$', line)
    if m and "device-facing" not in m.group(2):
        problem("port_on_all_interfaces", m.group(1))

# The gateway configuration's hosts are services of this file.
gw_toml = os.path.join(here, "gateway", "gateway.toml")
hosts = set()
for m in re.finditer(r'^\s*(?:url|endpoint|brokers)\s*=\s*"([^"]+)"', open(gw_toml).read(), re.M):
    for part in m.group(1).split(","):
        u = urllib.parse.urlparse(part if "://" in part else "tcp://" + part)
        if u.hostname and u.scheme != "file":
            hosts.add(u.hostname)
for h in sorted(hosts):
    if h not in services:
        problem("unknown_service", f"gateway.toml points to {h}, which compose does not define")

for p in problems:
    print(json.dumps(p))

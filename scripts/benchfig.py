"""One figure of `make bench` for scripts/bench-report.py: a JSON line
appended to the figures file (the format of `figure` in bench-lib.sh):
name, value, unit, the script it came from, when, the gateway build, and
optionally the ceiling measured in the same run ((name, value)), the
issue's target, the check that decides `met` ("ratio <= 1.0",
"value <= 50") and a note. bench-report.py derives the ratio."""

import json
import time
from pathlib import Path


def figure(path, source, name, value, unit, ceiling=None, target=None, check=None, note=None, build=None):
    fig = {"name": name, "value": value, "unit": unit, "source": source,
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "build": build}
    if ceiling:
        fig["ceiling"] = {"name": ceiling[0], "value": ceiling[1]}
    for k, v in (("target", target), ("check", check), ("note", note)):
        if v is not None:
            fig[k] = v
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(fig) + "\n")

#!/usr/bin/env python3
"""What the status page costs the gateway (issue 34, item 7): HTTP ingest
throughput with the page open and polling (headless Chromium, signed in)
against the same run without it, and the gateway's idle RSS before and after
a minute of the page polling.

Each throughput run gets a fresh gateway and data dir (the WAL's size must
not favour one side); runs alternate (without, with, without, with, ...) and
the medians are compared. wrk + bench/ingest.lua drive POST /ingest as
`make bench` does. The browser runs on the same machine, so its own CPU is
part of the "with" figure (on site it runs on the technician's laptop).

    .venv-test/bin/python scripts/status-cost.py [--bin PATH] [--runs 3]
        [--duration 10s] [--conns 64] [--idle 60]

Prints a Markdown summary; no threshold is asserted (numbers, not a test).
"""

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

os.environ["SE_OFFLINE"] = "true"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


class Gateway:
    def __init__(self, binary):
        self.dir = tempfile.mkdtemp(prefix="status-cost-")
        self.port = free_port()
        self.base = "http://127.0.0.1:%d" % self.port
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env["GATEWAY_INGEST_RATE_LIMIT_PER_DEVICE"] = "0"
        self.proc = subprocess.Popen(
            [binary, "run", "--log-level", "warn", "--mqtt-url", "off",
             "--http-addr", "127.0.0.1:%d" % self.port, "--data-dir", self.dir],
            stdout=subprocess.DEVNULL, env=env)
        for _ in range(200):
            try:
                if urllib.request.urlopen(self.base + "/readyz", timeout=1).status == 200:
                    break
            except Exception:
                time.sleep(0.1)
        else:
            raise SystemExit("the gateway did not become ready")
        self.token = open(os.path.join(self.dir, "admin.token")).read().strip()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=20)
        shutil.rmtree(self.dir, ignore_errors=True)


def browser(gw):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1920,1080"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    d.get(gw.base + "/")
    d.find_element(By.ID, "token").send_keys(gw.token)
    d.find_element(By.ID, "signin-button").click()
    WebDriverWait(d, 20).until(lambda d: d.find_element(By.ID, "conn").text.startswith("Live"))
    return d


def wrk(gw, duration, conns, run_id):
    out = subprocess.run(
        ["wrk", "-t2", "-c%d" % conns, "-d" + duration, "--timeout", "10s",
         "-s", os.path.join(ROOT, "bench/ingest.lua"), gw.base, "--", run_id, "50"],
        capture_output=True, text=True, check=True).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return float(m.group(1))


def main():
    ap = argparse.ArgumentParser()
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    ap.add_argument("--bin", default=os.path.join(target, "debug", "gateway"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", default="10s")
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--idle", type=int, default=60, help="seconds of polling for the RSS figure")
    a = ap.parse_args()

    # Idle RSS: one gateway, settled; then the page polls it for --idle s.
    gw = Gateway(a.bin)
    time.sleep(15)
    before = rss_kb(gw.proc.pid)
    d = browser(gw)
    time.sleep(a.idle)
    polled = rss_kb(gw.proc.pid)
    d.quit()
    gw.stop()

    without, with_page = [], []
    for i in range(a.runs):
        for page in (False, True):
            gw = Gateway(a.bin)
            d = browser(gw) if page else None
            time.sleep(3)
            rps = wrk(gw, a.duration, a.conns, "cost%d%s%d" % (i, "p" if page else "n", time.time()))
            (with_page if page else without).append(rps)
            if d:
                d.quit()
            gw.stop()
            print("run %d %-12s %.0f req/s" % (i + 1, "page open" if page else "no page", rps),
                  file=sys.stderr, flush=True)

    mw, mp = statistics.median(without), statistics.median(with_page)
    print("## Status page cost (%s, `%s`)" % (time.strftime("%Y-%m-%d"), os.path.basename(a.bin)))
    print()
    print("| | without the page | with the page open (1 s poll) |")
    print("|---|---|---|")
    print("| HTTP ingest, median of %d runs (wrk -t2 -c%d -d%s) | %.0f req/s | %.0f req/s (%.1f %%) |"
          % (a.runs, a.conns, a.duration, mw, mp, 100.0 * mp / mw))
    print("| runs | %s | %s |" % (", ".join("%.0f" % x for x in without),
                                  ", ".join("%.0f" % x for x in with_page)))
    print("| idle RSS | %d KB | %d KB after %d s of polling (%+d KB) |"
          % (before, polled, a.idle, polled - before))


if __name__ == "__main__":
    main()

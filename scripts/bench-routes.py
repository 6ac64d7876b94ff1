#!/usr/bin/env python3
"""Routes and live-first benchmarks (scripts/bench-routes.sh runs this).

1. Rule cost: HTTP ingest throughput with 20 routing and priority rules
   (19 [[priority]] rules that a record walks through, 1 route) against the
   same gateway without rules, in alternating runs of the same load (wrk,
   bench/ingest.lua). Reported as a ratio: the target is >= 0.90.
2. Live-first: a sink (an HTTP server here that reads each body and answers
   200) paused while a backlog of BACKLOG records builds up; then it resumes
   while live records arrive at LIVE_RATE/s. Measured at the far side: the
   receive -> arrival latency of the live records (p50, p99; target p99 <=
   2 s) and the time the backlog takes to drain, with `drain = "live_first"`
   against the same run with `fifo` (target: the live-first backlog drains at
   >= 50 % of the fifo rate).

Usage: bench-routes.py GATEWAY_BIN WORK_DIR OUT_MD
Environment: BENCH_ROUTES_WRK_SECS (10), BENCH_ROUTES_ROUNDS (2),
BENCH_ROUTES_BACKLOG (200000), BENCH_ROUTES_LIVE_RATE (50), BENCH_FIGURES
(default: figures.jsonl beside OUT_MD; the key figures go there as JSON
lines, like `figure` in scripts/bench-lib.sh, for scripts/bench-report.py).
"""

import http.server
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchfig  # noqa: E402  one figure line for bench-report.py

GW, WORK, OUT = sys.argv[1], sys.argv[2], sys.argv[3]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WRK_SECS = int(os.environ.get("BENCH_ROUTES_WRK_SECS", "10"))
ROUNDS = int(os.environ.get("BENCH_ROUTES_ROUNDS", "2"))
BACKLOG = int(os.environ.get("BENCH_ROUTES_BACKLOG", "200000"))
LIVE_RATE = int(os.environ.get("BENCH_ROUTES_LIVE_RATE", "50"))
LIVE_AFTER_S = 10
FIGURES = os.environ.get("BENCH_FIGURES") or os.path.join(os.path.dirname(os.path.abspath(OUT)), "figures.jsonl")


def log(msg):
    print(f"==> {msg}", file=sys.stderr, flush=True)


def figure(name, value, unit, **kw):
    """One figure for scripts/bench-report.py, with the build of the gateway measured."""
    try:
        build = subprocess.run([GW, "--version"], capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        build = None
    benchfig.figure(FIGURES, "bench-routes", name, value, unit, build=build, **kw)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Gateway:
    def __init__(self, name, config):
        self.dir = os.path.join(WORK, name)
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        cfg = os.path.join(self.dir, "gateway.toml")
        with open(cfg, "w") as f:
            f.write(f'data_dir = "{self.dir}/data"\n[mqtt]\nurl = "off"\n' + config)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.setdefault("MIMALLOC_ARENA_EAGER_COMMIT", "0")
        self.proc = subprocess.Popen(
            [GW, "--config", cfg, "run", "--log-level", "warn", "--http-addr", f"127.0.0.1:{self.port}"],
            stdout=open(os.path.join(self.dir, "log"), "w"), stderr=subprocess.STDOUT, env=env)
        for _ in range(300):
            try:
                urllib.request.urlopen(self.url("/readyz"), timeout=1)
                break
            except Exception:
                if self.proc.poll() is not None:
                    sys.exit(f"gateway {name} exited: see {self.dir}/log")
                time.sleep(0.1)
        self.token = open(os.path.join(self.dir, "data", "admin.token")).read().strip()

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def admin(self, path):
        req = urllib.request.Request(self.url(path), method="POST", data=b"",
                                     headers={"Authorization": f"Bearer {self.token}"})
        return urllib.request.urlopen(req, timeout=10).read()

    def post(self, device, body):
        req = urllib.request.Request(self.url(f"/ingest/{device}"), data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wrk(gw, run_id):
    out = subprocess.run(
        ["wrk", "-t2", "-c64", f"-d{WRK_SECS}s", "-s", os.path.join(ROOT, "bench/ingest.lua"),
         gw.url(""), "--", run_id, "50"],
        capture_output=True, text=True, check=True).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return float(m.group(1))


def rule_cost():
    sinks = ('[sinks.archive]\nkind = "s3"\nurl = "file://{d}/archive"\n'
             '[sinks.pumps]\nkind = "s3"\nurl = "file://{d}/pumps"\n')
    rules = "".join(
        f'[[priority]]\nclass = "low"\nmatch = {{ devices = ["never-{i}-*"], tags = {{ site = "x{i}" }} }}\n'
        for i in range(19))
    route = '[sinks.pumps.route]\ndevices = ["sensor-0*", "sensor-1*"]\nmetrics_any = ["t"]\n'
    plain, ruled = [], []
    for r in range(ROUNDS):
        for name, extra, acc in (("plain", "", plain), ("rules", rules, ruled)):
            d = os.path.join(WORK, f"{name}{r}")
            gw = Gateway(f"{name}{r}", sinks.format(d=d) + (route if extra else "") + extra)
            try:
                acc.append(wrk(gw, f"{name}{r}"))
            finally:
                gw.stop()
            log(f"{name} round {r}: {acc[-1]:.0f} req/s")
    a, b = statistics.median(plain), statistics.median(ruled)
    return a, b


class Far(http.server.BaseHTTPRequestHandler):
    """The sink's far side: notes when each record arrived."""
    arrivals = {}
    lock = threading.Lock()

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        now = time.time()
        with Far.lock:
            for line in body.splitlines():
                key = json.loads(line)["idempotency_key"]
                Far.arrivals.setdefault(key, now)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


def live_first(drain):
    Far.arrivals = {}
    far = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Far)
    threading.Thread(target=far.serve_forever, daemon=True).start()
    gw = Gateway(f"live-{drain}",
                 f'[sinks.api]\nkind = "http"\nurl = "http://127.0.0.1:{far.server_port}/ingest"\n'
                 f'paused = true\nbatch_max_records = 1000\ndrain = "{drain}"\nlive_after = "{LIVE_AFTER_S}s"\n')
    try:
        log(f"{drain}: building a backlog of {BACKLOG} records")
        n, batch = 0, 500
        while n < BACKLOG:
            recs = ",".join(
                f'{{"msg_id":"b{i}","ts":{1764057600000 + i},"metrics":{{"t":{i % 100}}}}}'
                for i in range(n, min(n + batch, BACKLOG)))
            assert gw.post(f"dev-{n // batch % 20}", f"[{recs}]") == 202
            n += batch
        time.sleep(LIVE_AFTER_S + 1)
        sent = {}
        stop = threading.Event()

        def live():
            i = 0
            while not stop.is_set():
                key = f"live-{i % 5}:l{i}"
                sent[key] = time.time()
                gw.post(f"live-{i % 5}", f'{{"msg_id":"l{i}","ts":1764057600000,"metrics":{{"t":1}}}}')
                i += 1
                time.sleep(1 / LIVE_RATE)

        t = threading.Thread(target=live)
        t.start()
        time.sleep(1)
        resumed = time.time()
        gw.admin("/admin/sinks/api/resume")
        while True:
            with Far.lock:
                done = sum(1 for k in Far.arrivals if k.startswith("dev-"))
            if done >= BACKLOG:
                break
            time.sleep(0.05)
        drained = time.time() - resumed
        time.sleep(2)
        stop.set()
        t.join()
        time.sleep(2)
        with Far.lock:
            lat = sorted(Far.arrivals[k] - s for k, s in sent.items() if k in Far.arrivals and s >= resumed)
            missing = sum(1 for k in sent if k not in Far.arrivals)
        p50 = lat[len(lat) // 2]
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        log(f"{drain}: backlog drained in {drained:.2f}s; live p50 {p50 * 1000:.0f} ms p99 {p99 * 1000:.0f} ms ({len(lat)} live, {missing} missing)")
        return drained, p50, p99, len(lat), missing
    finally:
        gw.stop()
        far.shutdown()


def main():
    log(f"rule cost: {ROUNDS} rounds of {WRK_SECS}s, no rules vs 20 rules")
    plain, ruled = rule_cost()
    fifo = live_first("fifo")
    lf = live_first("live_first")
    with open(OUT, "a") as f:
        f.write("\n## Routes, priorities and live-first (scripts/bench-routes.sh)\n\n")
        f.write(f"Rule cost: HTTP ingest (wrk, 64 connections, {WRK_SECS}s, median of {ROUNDS} alternating runs), two file sinks.\n\n")
        f.write("| rules | req/s | ratio |\n|---|---|---|\n")
        f.write(f"| none | {plain:.0f} | 1.00 |\n| 19 priority + 1 route | {ruled:.0f} | {ruled / plain:.2f} (target >= 0.90) |\n\n")
        f.write(f"Live-first: an HTTP sink paused while {BACKLOG} records build up, then resumed while live records arrive at {LIVE_RATE}/s (live_after {LIVE_AFTER_S}s).\n\n")
        f.write("| drain | backlog drain time | backlog rate | live p50 | live p99 | live records | missing |\n|---|---|---|---|---|---|---|\n")
        for name, (d, p50, p99, n, miss) in (("fifo", fifo), ("live_first", lf)):
            f.write(f"| {name} | {d:.2f} s | {BACKLOG / d:.0f}/s | {p50 * 1000:.0f} ms | {p99 * 1000:.0f} ms | {n} | {miss} |\n")
        f.write(f"\nlive_first backlog rate / fifo: {fifo[0] / lf[0]:.2f} (target >= 0.50); live p99 {lf[2]:.2f} s (target <= 2 s)\n")
    figure("routes.rule_cost.rps", round(ruled), "req/s", ceiling=("the same load without rules", round(plain)),
           target="HTTP ingest with 20 routing and priority rules drops <= 10 % against no rules (issue 11)",
           check="ratio >= 0.90", note=f"wrk -t2 -c64 -d{WRK_SECS}s, median of {ROUNDS} alternating runs")
    figure("routes.live_first.live_p99", round(lf[2], 3), "s",
           target="live records' receive -> sink-ack p99 <= 2 s while a 200k backlog drains (issue 11)",
           check="value <= 2", note=f"{lf[3]} live records at {LIVE_RATE}/s, {lf[4]} missing; with fifo: p99 {fifo[2]:.2f} s")
    figure("routes.live_first.backlog_rate", round(BACKLOG / lf[0]), "records/s",
           ceiling=("the same backlog drained fifo", round(BACKLOG / fifo[0])),
           target="the backlog drains at >= 50 % of its fifo rate (issue 11)", check="ratio >= 0.50",
           note=f"a backlog of {BACKLOG} records to an HTTP sink")


main()

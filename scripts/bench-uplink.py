#!/usr/bin/env python3
"""The uplink's cost (`make bench`, section "uplink"; issue 33's targets).

    scripts/bench-uplink.py [--bin-dir DIR] [--records 20000] [--budget-secs 600]
                            [--budget-backlog 200000] [--only wire,reduce,budget,quota]

Realistic telemetry from `loadgen --format site` (200 devices; per device a
temperature walking ±0.05 a reading, a humidity and a pressure walking too,
a counter, a rarely flipping boolean; 2 tags), over HTTP into the gateway.

- **wire** (targets 1 and 6): for the `http` sink and the `mqtt` sink with
  `payload = "batch"`, each with `compression` none, gzip and zstd: a backlog
  of --records built while the sink is paused, then resumed. The bytes on
  the wire a record are counted at the far side (the analytics server's
  request body bytes; the MQTT PUBLISH payload bytes a paho subscriber gets
  from a real Mosquitto), against the raw JSON decoded there. The drain rate
  is records over the time from resuming to the last record at the far
  side, with the gateway's CPU seconds over the same time.
- **reduce** (target 5): two `http` sinks given the same records, one
  unreduced (the input) and one with a deadband on every metric and a
  15-minute heartbeat; the share of metric values sent, and the far side's
  rebuild (the last value sent carried forward) checked against every input
  value: within its band, a boolean equal.
- **budget** (targets 2 and 3): --budget-backlog records held while paused,
  then drained under `budget = { bytes_per_s = 20000 }` (no compression, so
  the backlog outlasts the run) for --budget-secs, with a `high` alarm
  posted every second: the wire bytes per second at the far side against
  the budget (from 10 s after resuming, past the first burst), and each
  alarm's post -> far side delay.
- **quota** (target 4): `quota = { bytes = 400000, period = "1d",
  reserve_high = 100000 }` and a backlog well past it: the bytes that went
  past the normal share (at most one batch), alarms still delivered from
  the reserve, and after a restart the spent bytes still known and normal
  records still held.

Appends a section to bench/results/latest.md and one JSON line per figure to
bench/results/figures.jsonl. Exit status 1 when a run failed or a record was
lost.
"""

import argparse
import gzip
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchfig  # noqa: E402
import chaos  # noqa: E402  the servers, the gateway and the admin API

if Path(sys.prefix).resolve() != chaos.VENV_PY.parent.parent.resolve() and chaos.VENV_PY.exists():
    # paho-mqtt and zstandard (the far sides) live in .venv-test.
    os.execv(chaos.VENV_PY, [str(chaos.VENV_PY), __file__] + sys.argv[1:])

import paho.mqtt.client as paho  # noqa: E402
import zstandard  # noqa: E402

ROOT = chaos.ROOT
RESULTS = Path(os.environ.get("BENCH_RESULTS", ROOT / "bench/results/latest.md"))
FIGURES = Path(os.environ.get("BENCH_FIGURES", ROOT / "bench/results/figures.jsonl"))
DEVICES = 200
REDUCE = ('deadband = { temperature_c = 0.2, humidity_pct = 0.5, pressure_hpa = 0.5, cycles = 100, '
          'door_open = 0 }\nheartbeat = "15m"\n')
BANDS = {"temperature_c": 0.2, "humidity_pct": 0.5, "pressure_hpa": 0.5, "cycles": 100}
HIGH = '[[priority]]\nclass = "high"\nmatch = { devices = ["alarm-*"] }\n'


def cpu_secs(pid):
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def http_json(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def set_key(gw, key, value):
    chaos.admin_post(gw, "/admin/config", {"key": key, "value": value})


def load(ctx, gw, work, count, name="site"):
    """`count` site records over HTTP as fast as they are acknowledged (64
    connections: each waits out the WAL's commit window for its answer)."""
    out = Path(work) / f"loadgen-{name}.out"
    with open(out, "w") as f:
        p = subprocess.run([ctx.loadgen_bin, "http", "--url", gw.url(""), "--connections", "64",
                            "--devices", str(DEVICES), "--device-prefix", "sensor", "--format", "site",
                            "--count", str(count), "--run-id", f"{ctx.run_tag}{name}"],
                           stdout=f, stderr=subprocess.STDOUT, timeout=1800)
    summary = json.loads(out.read_text().strip().splitlines()[-1])
    if p.returncode != 0 or summary.get("acked") != count:
        raise chaos.ChaosFailure(f"loadgen: {summary}")
    return summary


def wait_enqueued(gw, sink, count, timeout=120):
    chaos.wait_for(f"{count} records enqueued for {sink}", timeout,
                   lambda: gw.wal()["sinks"][sink]["enqueued"] >= count, 0.2)


class Subscriber:
    """A paho (MQTT 5) subscriber on the batch topic: payload bytes on the
    wire, the records inside (decoded) and when the last one came."""

    def __init__(self, port):
        self.wire = self.raw = self.records = 0
        self.last_at = None
        self.lock = threading.Lock()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-uplink",
                                  protocol=paho.MQTTv5)
        self.client.on_message = self.on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("cloud/#", qos=1)
        self.client.loop_start()

    def on_message(self, _client, _userdata, msg):
        props = dict(getattr(msg.properties, "UserProperty", None) or [])
        enc = props.get("content-encoding", "identity")
        body = msg.payload
        if enc == "gzip":
            body = gzip.decompress(body)
        elif enc == "zstd":
            body = zstandard.ZstdDecompressor().decompressobj().decompress(body)
        with self.lock:
            self.wire += len(msg.payload)
            self.raw += len(body)
            self.records += sum(1 for line in body.splitlines() if line.strip())
            self.last_at = time.monotonic()

    def stats(self):
        with self.lock:
            return {"records": self.records, "wire_bytes": self.wire, "body_bytes": self.raw}

    def stop(self):
        self.client.loop_stop()
        self.client.disconnect()


def wire_run(ctx, args, kind, compression):
    """One backlog of site records drained through one sink: its figures."""
    work = ctx.run_dir / f"wire-{kind}-{compression}"
    work.mkdir(parents=True)
    if kind == "http":
        far = chaos.Analytics(work, "api")
        far.start()
        sink = f'[sinks.up]\nkind = "http"\nurl = "http://127.0.0.1:{far.port}/ingest"\n' \
               f'compression = "{compression}"\n'
        stats = lambda: http_json(f"http://127.0.0.1:{far.port}/stats")  # noqa: E731
        sub = None
    else:
        far = chaos.Mosquitto(work, "cloud")
        far.start()
        sub = Subscriber(far.port)
        sink = f'[sinks.up]\nkind = "mqtt"\nurl = "{far.url()}"\ntopic_prefix = "cloud"\nversion = "5"\n' \
               f'payload = "batch"\ncompression = "{compression}"\n'
        stats = sub.stats
    gw = chaos.Gateway(ctx, work, chaos.gateway_config('[mqtt]\nurl = "off"\n', sink))
    try:
        gw.start()
        set_key(gw, "sinks.up.paused", True)
        load(ctx, gw, work, args.records)
        wait_enqueued(gw, "up", args.records)
        cpu0, t0 = cpu_secs(gw.pid()), time.monotonic()
        set_key(gw, "sinks.up.paused", False)
        last = [0, t0]

        def drained():
            gw.check_alive()
            n = stats()["records"]
            if n != last[0]:
                last[:] = [n, time.monotonic()]
            return n >= args.records
        chaos.wait_for(f"{kind}/{compression}: the backlog at the far side", 600, drained, 0.05)
        secs = last[1] - t0
        cpu = cpu_secs(gw.pid()) - cpu0
        s = stats()
        return {"kind": kind, "compression": compression, "records": s["records"],
                "wire": s["wire_bytes"] / s["records"], "raw": s["body_bytes"] / s["records"],
                "rate": args.records / secs, "cpu": cpu, "secs": secs}
    finally:
        gw.stop()
        if sub:
            sub.stop()
        chaos.CHILDREN.stop_all()


def read_ndjson(path):
    """Records by idempotency key (a resent copy replaces the first)."""
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                v = json.loads(line)
                out[v["idempotency_key"]] = v
    return out


def reduce_run(ctx, args):
    work = ctx.run_dir / "reduce"
    work.mkdir(parents=True)
    raw, red = chaos.Analytics(work, "raw"), chaos.Analytics(work, "red")
    for a in (raw, red):
        a.start()
    sinks = (f'[sinks.raw]\n{raw.sink_toml(None)}\n[sinks.red]\n{red.sink_toml(None)}compression = "zstd"\n'
             f'[sinks.red.reduce]\n{REDUCE}')
    gw = chaos.Gateway(ctx, work, chaos.gateway_config('[mqtt]\nurl = "off"\n', sinks))
    try:
        gw.start()
        load(ctx, gw, work, args.records)
        chaos.wait_for("the raw sink has every record", 300,
                       lambda: len(read_ndjson(raw.out)) >= args.records, 0.5)
        chaos.wait_for("the reduced sink to drain", 300, lambda: chaos.backlog_gone(gw, "red"), 0.5)
        raw_stats = http_json(f"http://127.0.0.1:{raw.port}/stats")
        red_stats = http_json(f"http://127.0.0.1:{red.port}/stats")
    finally:
        gw.stop()
        chaos.CHILDREN.stop_all()
    inp = sorted(read_ndjson(raw.out).values(), key=lambda v: v["seq"])
    out = read_ndjson(red.out)
    values_in = sum(len(v["metrics"]) for v in inp)
    values_out = sum(len(v["metrics"]) for v in out.values())
    per_metric_in, per_metric_out = {}, {}
    last, worst, bad = {}, {}, []
    for r in inp:
        sent = out.get(r["idempotency_key"], {}).get("metrics", {})
        for m, x in r["metrics"].items():
            per_metric_in[m] = per_metric_in.get(m, 0) + 1
            slot = (r["device_id"], m)
            if m in sent:
                per_metric_out[m] = per_metric_out.get(m, 0) + 1
                last[slot] = sent[m]
            if slot not in last:
                bad.append(f"{slot}: no value at the far side")
                continue
            rebuilt = last[slot]
            if m in BANDS:
                err = abs(x - rebuilt) / BANDS[m]
                worst[m] = max(worst.get(m, 0.0), err)
                if err >= 1.0 + 1e-9:
                    bad.append(f"{slot}: {x} rebuilt as {rebuilt}")
            elif x != rebuilt:
                bad.append(f"{slot}: {x} rebuilt as {rebuilt}")
    return {"records": len(inp), "values_in": values_in, "values_out": values_out,
            "share": 100.0 * values_out / values_in,
            "raw_bytes": raw_stats["wire_bytes"] / len(inp), "red_body": red_stats["body_bytes"] / len(inp),
            "red_wire": red_stats["wire_bytes"] / len(inp), "red_records": len(out),
            "per_metric": {m: 100.0 * per_metric_out.get(m, 0) / n for m, n in per_metric_in.items()},
            "worst": worst, "bad": bad}


class Alarms(threading.Thread):
    """A `high` record posted every second; each one's post -> far side delay."""

    def __init__(self, gw, far_file):
        super().__init__(daemon=True)
        self.gw, self.far, self.stop_ev = gw, far_file, threading.Event()
        self.posted, self.arrived, self.failures = {}, {}, []

    def run(self):
        i, offset, nxt = 0, 0, time.monotonic()
        while not self.stop_ev.is_set():
            now = time.monotonic()
            if now >= nxt:
                key = f"alarm-1:a{i}"
                body = json.dumps({"msg_id": f"a{i}", "ts": int(time.time() * 1000), "metrics": {"alarm": 1}})
                req = urllib.request.Request(self.gw.url("/ingest/alarm-1"), data=body.encode(),
                                             headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=5) as r:
                        if r.status == 202:
                            self.posted[key] = time.monotonic()
                except OSError as e:
                    self.failures.append(str(e))
                i, nxt = i + 1, nxt + 1.0
            try:
                with open(self.far, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
            except OSError:
                chunk = b""
            end = chunk.rfind(b"\n") + 1
            offset += end
            t = time.monotonic()
            for line in chunk[:end].split(b"\n"):
                if b'"alarm-1:a' in line:
                    key = json.loads(line)["idempotency_key"]
                    self.arrived.setdefault(key, t)
            self.stop_ev.wait(0.05)

    def delays(self):
        return sorted(self.arrived[k] - t for k, t in self.posted.items() if k in self.arrived)


def budget_run(ctx, args):
    work = ctx.run_dir / "budget"
    work.mkdir(parents=True)
    far = chaos.Analytics(work, "api")
    far.start()
    sink = f'[sinks.up]\n{far.sink_toml(None)}budget = {{ bytes_per_s = 20000 }}\n'
    gw = chaos.Gateway(ctx, work, chaos.gateway_config('[mqtt]\nurl = "off"\n', HIGH + sink))
    stats = lambda: http_json(f"http://127.0.0.1:{far.port}/stats")  # noqa: E731
    alarms = None
    try:
        gw.start()
        set_key(gw, "sinks.up.paused", True)
        load(ctx, gw, work, args.budget_backlog)
        wait_enqueued(gw, "up", args.budget_backlog, 300)
        set_key(gw, "sinks.up.paused", False)
        alarms = Alarms(gw, far.out)
        alarms.start()
        time.sleep(10)
        b0, t0 = stats()["wire_bytes"], time.monotonic()
        samples = []
        while time.monotonic() - t0 < args.budget_secs:
            time.sleep(min(10, args.budget_secs - (time.monotonic() - t0)))
            gw.check_alive()
            samples.append((time.monotonic() - t0, stats()["wire_bytes"] - b0))
        secs = time.monotonic() - t0
        sent = stats()["wire_bytes"] - b0
        left = gw.wal()["sinks"]["up"]["enqueued"]
        time.sleep(3)
        alarms.stop_ev.set()
        alarms.join()
    finally:
        if alarms:
            alarms.stop_ev.set()
        gw.stop()
        chaos.CHILDREN.stop_all()
    d = alarms.delays()
    p99 = d[min(len(d) - 1, int(0.99 * len(d)))] if d else None
    per_min = [round((b - a) / (t2 - t1)) for (t1, a), (t2, b) in zip(samples[5::6], samples[11::6])]
    return {"secs": secs, "bytes": sent, "rate": sent / secs, "left": left, "alarms": len(alarms.posted),
            "alarms_arrived": len(d), "p99": p99, "max": d[-1] if d else None, "per_min": per_min,
            "failures": alarms.failures}


def quota_run(ctx, args):
    work = ctx.run_dir / "quota"
    work.mkdir(parents=True)
    far = chaos.Analytics(work, "api")
    far.start()
    bytes_, reserve = 400000, 100000
    sink = (f'[sinks.up]\n{far.sink_toml(None)}'
            f'quota = {{ bytes = {bytes_}, period = "1d", reserve_high = {reserve} }}\n')
    gw = chaos.Gateway(ctx, work, chaos.gateway_config('[mqtt]\nurl = "off"\n', HIGH + sink))
    stats = lambda: http_json(f"http://127.0.0.1:{far.port}/stats")  # noqa: E731

    def spent():
        return sink_state(gw)["quota_spent_bytes"]

    def count(prefix):
        return sum(1 for k in read_ndjson(far.out) if k.startswith(prefix))

    def alarm(i):
        body = json.dumps({"msg_id": f"a{i}", "ts": int(time.time() * 1000), "metrics": {"alarm": 1}})
        req = urllib.request.Request(gw.url("/ingest/alarm-1"), data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 202

    try:
        gw.start()
        load(ctx, gw, work, 3000)
        chaos.wait_for("normal records held at the quota", 60, lambda: any(
            v > 0 for (n, labels), v in gw.metrics().items()
            if n == "gateway_sink_held_records" and ("reason", "quota") in labels), 0.2)
        time.sleep(1)
        normal_wire = stats()["wire_bytes"]
        normal = count("sensor-")
        for i in range(5):
            alarm(i)
        chaos.wait_for("5 alarms from the reserve", 30, lambda: count("alarm-1:") == 5, 0.1)
        time.sleep(1)
        normal_after_alarms = count("sensor-")
        before = spent()
        gw.stop()
        gw.start()
        # The dispatcher reads its quota file once it runs.
        chaos.wait_for("the quota reloaded", 30, lambda: spent() is not None, 0.1)
        after = spent()
        alarm(5)
        chaos.wait_for("an alarm after the restart", 30, lambda: count("alarm-1:") == 6, 0.1)
        time.sleep(2)
        normal_after_restart = count("sensor-")
    finally:
        gw.stop()
        chaos.CHILDREN.stop_all()
    return {"quota": bytes_, "reserve": reserve, "normal_wire": normal_wire,
            "excess": normal_wire - (bytes_ - reserve), "normal": normal, "held_ok": normal == normal_after_alarms
            == normal_after_restart, "spent_before": before, "spent_after": after, "batch_bytes":
            normal_wire / max(1, normal) * 500}


def sink_state(gw):
    """The `state` of sink `up` in GET /admin/sinks (a list, one per sink)."""
    sinks = json.loads(gw._get("/admin/sinks", token=True))
    return next(s["state"] for s in sinks if s["name"] == "up")


def figure(name, value, unit, **kw):
    benchfig.figure(FIGURES, "bench-uplink", name, value, unit, **kw)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin-dir", default=str(ROOT / "target" / os.environ.get("BENCH_PROFILE", "dist")))
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--budget-secs", type=int, default=600)
    ap.add_argument("--budget-backlog", type=int, default=200000)
    ap.add_argument("--only", default="wire,reduce,budget,quota")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir")
    args = ap.parse_args()
    only = {s.strip() for s in args.only.split(",")}
    ctx = chaos.BenchCtx(args.bin_dir, "uplink", "u")
    chaos.preflight(ctx)
    build = os.popen(f"'{ctx.gateway_bin}' --version 2>/dev/null").read().strip() or None
    failed = []
    lines = ["", f"### Uplink: bytes, budgets, quotas, reduction (scripts/bench-uplink.py, "
             f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())})", "",
             f"{build or ctx.gateway_bin}; {os.cpu_count()} cores. Realistic telemetry from `loadgen --format site` "
             f"({DEVICES} devices; temperature walking ±0.05 a reading, humidity, pressure, a counter, a boolean; "
             "2 tags), HTTP ingest."]

    def guarded(name, fn):
        try:
            return fn()
        except chaos.ChaosFailure as e:
            failed.append(f"{name}: {e}")
            lines.extend(["", f"**{name}: FAILED**: {e}"])
        finally:
            chaos.CHILDREN.stop_all()
        return None

    if "wire" in only:
        rows = [r for r in (guarded(f"wire {k}/{c}", lambda k=k, c=c: wire_run(ctx, args, k, c))
                            for k in ("http", "mqtt") for c in ("none", "gzip", "zstd")) if r]
        lines += ["", f"Bytes on the wire and drain rate (targets 1 and 6): a backlog of {args.records} records "
                  "built while the sink is paused, then resumed; bytes counted at the far side (HTTP request "
                  "bodies; MQTT PUBLISH payloads, `payload = \"batch\"`, v5), batches of the default 500.", "",
                  "| sink | compression | raw JSON B/record | wire B/record | wire / raw | drain records/s "
                  "| vs none | gateway CPU ms / 1k records |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        base = {r["kind"]: r for r in rows if r["compression"] == "none"}
        for r in rows:
            share = 100.0 * r["wire"] / r["raw"]
            vs = r["rate"] / base[r["kind"]]["rate"] if r["kind"] in base else None
            lines.append(f"| {r['kind']} | {r['compression']} | {r['raw']:.0f} | {r['wire']:.1f} | {share:.1f} % "
                         f"| {r['rate']:.0f} | {'-' if vs is None else f'{100 * vs:.0f} %'} "
                         f"| {1000 * r['cpu'] / r['records'] * 1000:.0f} |")
            limit = {"zstd": 15, "gzip": 30}.get(r["compression"])
            name = f"uplink.{r['kind']}.{r['compression']}"
            if limit:
                figure(f"{name}.wire_share", round(share, 2), "% of raw JSON",
                       target=f"<= {limit} % of the raw JSON (issue 33, target 1)", check=f"value <= {limit}",
                       note=f"{r['wire']:.1f} of {r['raw']:.0f} B a record at the far side", build=build)
            if vs is not None and r["compression"] == "zstd":
                figure(f"{name}.drain", round(r["rate"]), "records/s",
                       ceiling=(f"uplink.{r['kind']}.none.drain", round(base[r['kind']]['rate'])),
                       target=">= 50 % of the uncompressed drain rate (issue 33, target 6)", check="ratio >= 0.5",
                       note=f"{100 * vs:.0f} % of the uncompressed drain rate", build=build)
    if "reduce" in only:
        r = guarded("reduce", lambda: reduce_run(ctx, args))
        if r:
            per = ", ".join(f"{m} {p:.1f} %" for m, p in sorted(r["per_metric"].items()))
            worst = ", ".join(f"{m} {w:.2f}" for m, w in sorted(r["worst"].items()))
            lines += ["", f"Report-by-exception (target 5): {r['records']} records through "
                      f"`[sinks.X.reduce] {REDUCE.strip()}`: the sink sent {r['values_out']} of {r['values_in']} "
                      f"metric values (**{r['share']:.1f} %**; {per}). The far side's rebuild (last value "
                      f"carried forward) against every input value: worst error as a share of the band: {worst}; "
                      f"{len(r['bad'])} values outside their band{': ' + '; '.join(r['bad'][:3]) if r['bad'] else ''}. "
                      f"The reduced sink (zstd) sent {r['red_records']} records; per input record {r['red_body']:.1f} B "
                      f"of JSON, {r['red_wire']:.1f} B on the wire, against {r['raw_bytes']:.0f} B of raw JSON "
                      "unreduced."]
            figure("uplink.reduce.values_sent", round(r["share"], 2), "% of metric values",
                   target="<= 10 % of the metric values on slowly varying data (issue 33, target 5)",
                   check="value <= 10", note=f"{r['values_out']} of {r['values_in']}", build=build)
            figure("uplink.reduce.outside_band", len(r["bad"]), "values",
                   target="the far side rebuilds every value within its deadband", check="value == 0", build=build)
            if r["bad"]:
                failed.append(f"reduce: {len(r['bad'])} values outside their band")
    if "budget" in only:
        r = guarded("budget", lambda: budget_run(ctx, args))
        if r:
            err = 100.0 * (r["rate"] - 20000) / 20000
            p99 = "-" if r["p99"] is None else f"{r['p99']:.2f} s"
            worst = "-" if r["max"] is None else f"{r['max']:.2f} s"
            lines += ["", f"Budget (targets 2 and 3): a backlog of {args.budget_backlog} records drained under "
                      f"`budget = {{ bytes_per_s = 20000 }}` (no compression): {r['bytes']} bytes at the far side "
                      f"in {r['secs']:.0f} s from 10 s after resuming = **{r['rate']:.0f} B/s ({err:+.2f} %)**; "
                      f"per minute: {', '.join(str(x) for x in r['per_min'])} B/s; {r['left']} records still "
                      f"held at the end. `high` alarms posted at 1/s meanwhile: {r['alarms_arrived']} of "
                      f"{r['alarms']} delivered, post -> far side p99 **{p99}**, max "
                      f"{worst}."]
            figure("uplink.budget.abs_error", round(abs(err), 2), "% off the budget",
                   target="within ±3 % of bytes_per_s over 10 minutes (issue 33, target 2)",
                   check="value <= 3", note=f"{r['rate']:.0f} B/s ({err:+.2f} %) over {r['secs']:.0f} s",
                   build=build)
            if r["p99"] is not None:
                figure("uplink.budget.high_p99", round(r["p99"], 3), "s",
                       target="high records at 1/s during the drain: p99 <= 2 s (issue 33, target 3)",
                       check="value <= 2", note=f"{r['alarms_arrived']} alarms", build=build)
            if r["alarms_arrived"] != r["alarms"]:
                failed.append(f"budget: {r['alarms'] - r['alarms_arrived']} alarms not delivered")
    if "quota" in only:
        r = guarded("quota", lambda: quota_run(ctx, args))
        if r:
            lines += ["", f"Quota (target 4): `quota = {{ bytes = {r['quota']}, period = \"1d\", reserve_high = "
                      f"{r['reserve']} }}` and a backlog of 3000 records: {r['normal']} normal records "
                      f"({r['normal_wire']} B) went, **{r['excess']:+d} B** past the normal share of "
                      f"{r['quota'] - r['reserve']} B (one batch of 500 is ~{r['batch_bytes']:.0f} B); 5 alarms "
                      f"went from the reserve; normal records stayed held (also after a restart: "
                      f"{'yes' if r['held_ok'] else 'NO'}); spent bytes before the restart {r['spent_before']}, "
                      f"after {r['spent_after']}."]
            figure("uplink.quota.excess", r["excess"], "B past the normal share",
                   target="a spent quota stops normal and low within one batch (issue 33, target 4)",
                   check=f"value <= {round(r['batch_bytes'])}", build=build)
            if not r["held_ok"] or r["spent_after"] != r["spent_before"]:
                failed.append("quota: normal records went on, or the spent bytes were not kept across a restart")
    lines.append("")
    text = "\n".join(lines) + "\n"
    print(text)
    if RESULTS.parent.exists():
        with open(RESULTS, "a") as f:
            f.write(text)
    for f in failed:
        print(f"bench-uplink: {f}", file=sys.stderr)
    if not failed and not args.keep and ctx.run_dir.exists():
        import shutil
        shutil.rmtree(ctx.run_dir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The cost of one record at steady rates (`make bench`; issue 31).

    scripts/bench-cost.py [--bin-dir DIR] [--rates 40,1000] [--secs 30] [--warmup 8]
                          [--runs default-http,default-mqtt,before-http,five-http,window]
                          [--windows 50ms,100ms,200ms]

Each run starts a fresh gateway and drives it at a steady rate with
`loadgen` for WARMUP + SECS seconds; over the last SECS it reads, from
/proc and the gateway's own metrics:

- CPU as a share of one core, and per record (the sum over the gateway's
  threads of their run time, /proc/PID/task/*/schedstat);
- bytes written to the storage layer (`write_bytes`) per record;
- write syscalls (`syscw`) per record;
- fsyncs (fsync + fdatasync) per record, counted by `perf stat -p` on
  syscall tracepoints in a window of FSYNC_SECS just after the others (a
  counting perf costs the counted threads CPU at each context switch);
- WAL commits a second (`gateway_wal_commits_total`);
- the device acknowledgement latency (loadgen: p50, p99).

Runs:
- `default-http`: the default config (embedded broker, the zero-config
  archive), records over HTTP from 50 devices, one keep-alive connection
  each (a device waits for its answer before it sends again; with fewer
  connections than a commit window's worth of records, each record waits
  the whole window: issue 31 measured the old gateway over 4);
- `default-mqtt`: the same gateway, QoS 1 through the embedded broker from
  200 device connections;
- `five-http`: all five sink kinds (file archive, S3 on moto, HTTP, MQTT to
  Mosquitto, Kafka on tansu: the chaos rig), over HTTP; with each sink's
  receive -> acknowledgement p99 over the same window (the `cloud` sink's
  is the MQTT sink's latency figure);
- `steady-http`: default-http at the last rate from 200 devices, on a WAL
  first filled for --prefill-secs (60) as fast as loadgen sends (~0.7-1M
  records): what a record costs once the dedup index holds hours of keys
  (each merge of the keys held in memory then rewrites many of its leaf
  pages), where the other runs start from an empty WAL;
- `window`: default-http at the first rate with `wal.commit_window` at each
  of --windows (the wear / latency curve);
- `before-http`: default-http with the settings before issue 31 (every
  acknowledgement committed at once, `wal.ack_flush = "0s"`; the archive
  batching for 5 ms), for a comparison in the same run.

The floors beside them, in the same run, at each rate:
- bare SQLite (Python's sqlite3, WAL mode, synchronous=FULL, default page
  size) inserting one 400-byte record per commit into a rowid table with no
  secondary index (bytes written);
- the stack's floor (examples/cost_floor.rs, `cost.stack-floor-*`; CPU):
  actix-web taking the same HTTP records from the same loadgen with nothing
  of the gateway, with and without a bare SQLite writer thread that
  group-commits over the default commit window and answers after the commit
  (the gateway's thread hops: worker -> writer -> worker).

Appends a section to bench/results/latest.md and one JSON line per figure to
bench/results/figures.jsonl (scripts/bench-report.py). Exit status 1 when a
run failed.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchfig  # noqa: E402  one figure line for bench-report.py
import chaos  # noqa: E402  the rig, the gateway, loadgen

ROOT = chaos.ROOT
RESULTS = ROOT / "bench/results/latest.md"
FIGURES = Path(os.environ.get("BENCH_FIGURES", ROOT / "bench/results/figures.jsonl"))
CLK_TCK = os.sysconf("SC_CLK_TCK")
FSYNC_EVENTS = "syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync"
RECORD_BYTES = 400  # the floor's record
FSYNC_SECS = 10  # the window fsyncs are counted over, after the others
PREFILL_RATE = 30000  # steady-http's fill: as fast as the gateway takes them
STEADY_DEVICES = 200  # steady-http's devices: the seed's site


def perf_works():
    if not shutil.which("perf"):
        return False
    r = subprocess.run(["perf", "stat", "-x,", "-e", FSYNC_EVENTS, "--", "true"],
                       capture_output=True, text=True)
    return r.returncode == 0 and "sys_enter_fsync" in r.stderr and "<not supported>" not in r.stderr


def count_fsyncs(pid, secs):
    """fsyncs (fsync + fdatasync) of every thread of `pid` over `secs`
    seconds (`perf stat -p`, attached only for this window: a counting
    perf costs the counted threads CPU at every context switch, ~0.3 % of
    a core at 40 records/s, so it is not attached while CPU is measured)."""
    r = subprocess.run(["perf", "stat", "-x,", "-e", FSYNC_EVENTS, "-p", str(pid), "--", "sleep", str(secs)],
                       capture_output=True, text=True)
    total, seen = 0, False
    for line in r.stderr.splitlines():
        parts = line.split(",")
        if len(parts) >= 3 and "sys_enter_f" in parts[2] and parts[0].strip().isdigit():
            total, seen = total + int(parts[0]), True
    return total if seen else None


def thread_cpu_ns(pid):
    """CPU time of each live thread of `pid` (ns, /proc/PID/task/*/schedstat):
    exact, where utime + stime are sampled at each 10 ms tick."""
    out = {}
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[t.name] = int((t / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return out


def cpu_between(c0, c1):
    """CPU seconds between two proc_counters: from the threads' schedstat when
    every thread lived through the window, else from utime + stime."""
    t0, t1 = c0["threads"], c1["threads"]
    if t0 and set(t0) <= set(t1):
        return sum(t1[k] - t0.get(k, 0) for k in t1) / 1e9
    return c1["cpu_s"] - c0["cpu_s"]


def proc_counters(pid):
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime + stime
    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return {"cpu_s": ticks / CLK_TCK, "threads": thread_cpu_ns(pid),
            "write_bytes": int(io["write_bytes"]), "syscw": int(io["syscw"])}


def accepted_and_commits(m):
    """Records accepted and WAL commits so far, from one /metrics scrape."""
    return (chaos.metric_sum(m, "gateway_ingest_records_total", outcome="accepted"),
            chaos.metric_sum(m, "gateway_wal_commits_total"))


def measure(ctx, args, name, config, kind, rate, perf, devices, prefill_secs=0):
    """One gateway at one rate: the figures of its last `secs` seconds.
    With `prefill_secs`, the WAL is first filled as fast as loadgen sends
    for that long (its dedup index then holds as many keys as after hours
    of a site), then the steady rate starts."""
    work = ctx.run_dir / f"{name}-{rate}"
    work.mkdir(parents=True, exist_ok=True)
    rig = None
    if config is None:  # the five sink kinds
        rig = chaos.Rig(work, ingest="off").start()
        config = rig.config()
    gw = chaos.Gateway(ctx, work, config)
    fsync_secs = FSYNC_SECS if perf else 0
    try:
        gw.start()
        pid = gw.proc.pid
        url = gw.url("") if kind == "http" else f"mqtt://127.0.0.1:{args.mqtt_port}"
        prefilled = 0
        if prefill_secs:
            # The same devices as the measured run: their keys land among the fill's.
            fill = loadgen(ctx, work, kind, url, PREFILL_RATE, prefill_secs, "fill", devices, prefix=kind)
            fill.start()
            fill.finish(prefill_secs + 60)
            time.sleep(5)  # the archive's last batch, the checkpointer's pass
            prefilled = int(accepted_and_commits(gw.metrics())[0])
        load = loadgen(ctx, work, kind, url, rate, args.warmup + args.secs + fsync_secs + 2, kind, devices)
        load.start()
        time.sleep(args.warmup)
        m0 = gw.metrics()
        t0, c0, (a0, k0) = time.monotonic(), proc_counters(pid), accepted_and_commits(m0)
        time.sleep(args.secs)
        t1, c1 = time.monotonic(), proc_counters(pid)
        m1 = gw.metrics()
        a1, k1 = accepted_and_commits(m1)
        # fsyncs a record, over a window of their own just after.
        fsyncs = None
        if fsync_secs:
            n = count_fsyncs(pid, fsync_secs)
            done = accepted_and_commits(gw.metrics())[0] - a1
            fsyncs = None if n is None or done <= 0 else n / done
        summary = load.finish(30)
        gw.check_alive()
        wall = t1 - t0
        records = a1 - a0
        if records <= 0:
            raise chaos.ChaosFailure(f"{name} at {rate}/s: no record accepted while measuring")
        cpu = cpu_between(c0, c1)
        return {
            "run": name, "rate": rate, "records": int(records), "secs": wall, "prefilled": prefilled,
            "cpu_pct": 100.0 * cpu / wall,
            "cpu_us": 1e6 * cpu / records,
            "bytes": (c1["write_bytes"] - c0["write_bytes"]) / records,
            "syscw": (c1["syscw"] - c0["syscw"]) / records,
            "fsyncs": fsyncs,
            "commits_s": (k1 - k0) / wall,
            "p50": (summary.get("latency_ms") or {}).get("p50"),
            "p99": (summary.get("latency_ms") or {}).get("p99"),
            # Receive -> sink acknowledgement, per sink (ms), over the same window.
            "sink_p99": {s: None if q is None else 1000 * q for s, q in (
                (s, chaos.quantile(0.99, chaos.histogram(m0, E2E, sink=s), chaos.histogram(m1, E2E, sink=s)))
                for s in sinks_of(m1))},
            # The share within 50 ms, read off the 50 ms bucket: "p99 <= 50 ms"
            # without interpolating inside the 50-80 ms bucket.
            "sink_within_50ms": {s: share_within(0.05, chaos.histogram(m0, E2E, sink=s), chaos.histogram(m1, E2E, sink=s))
                                 for s in sinks_of(m1)},
        }
    finally:
        gw.stop()
        chaos.CHILDREN.stop_all()


E2E = "gateway_e2e_latency_seconds"


def loadgen(ctx, work, kind, url, rate, secs, name, devices, prefix=None):
    """A loadgen run; over HTTP one keep-alive connection a device, as a
    fleet sends (a device waits for its answer before it sends again).
    Its devices are named after `prefix` (default: its name)."""
    load = chaos.Loadgen(ctx, work, kind, url, rate, secs, name, devices)

    def set_arg(flag, value):
        load.args[load.args.index(flag) + 1] = value

    if kind == "http":
        set_arg("--connections", devices)
    if prefix is not None:
        set_arg("--device-prefix", prefix)
    return load


def sinks_of(metrics):
    return sorted({dict(pairs).get("sink") for (n, pairs) in metrics if n == E2E + "_bucket"} - {None})


def share_within(le, before, after):
    """The share of a histogram's observations between two snapshots that
    fell in buckets up to `le` (a bucket bound); None if none."""
    prev = dict(before)
    delta = dict((b, c - prev.get(b, 0)) for b, c in after)
    total = delta.get(float("inf"), 0)
    return None if total <= 0 or le not in delta else delta[le] / total


FLOOR_CHILD = r"""
import os, sqlite3, sys, time
path, rate, warmup, secs, size = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
def io():
    d = dict(l.split(": ") for l in open("/proc/self/io").read().splitlines())
    return int(d["write_bytes"]), int(d["syscw"])
db = sqlite3.connect(path, isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
body = "x" * size
start = time.monotonic()
n = measured = 0
b0 = None
while True:
    now = time.monotonic()
    if b0 is None and now - start >= warmup:
        b0, w0, t0, n0, c0 = *io(), now, n, time.process_time()
    if now - start >= warmup + secs:
        break
    due = start + n / rate
    if due > now:
        time.sleep(due - now)
    db.execute("INSERT INTO t(body) VALUES(?)", (body,))
    n += 1
b1, w1 = io()
cpu = time.process_time() - c0
print(f"{(b1 - b0) / (n - n0)} {(w1 - w0) / (n - n0)} {n - n0} {100 * cpu / (time.monotonic() - t0)}")
"""


def floor(ctx, args, rate):
    """Bare SQLite, one RECORD_BYTES record per commit at `rate`: bytes and
    write syscalls per record, and its CPU (a share of one core; Python's
    loop included)."""
    work = ctx.run_dir / f"floor-{rate}"
    work.mkdir(parents=True, exist_ok=True)
    out = subprocess.run([sys.executable, "-c", FLOOR_CHILD, str(work / "floor.db"), str(rate),
                          str(args.warmup), str(args.secs), str(RECORD_BYTES)],
                         capture_output=True, text=True, check=True)
    b, w, n, cpu = out.stdout.split()
    return {"rate": rate, "bytes": float(b), "syscw": float(w), "records": int(n), "cpu_pct": float(cpu)}


# The gateway's default `wal.commit_window`: the stack floor groups its
# commits over the same window.
DEFAULT_WINDOW_MS = 30


def stack_floor(ctx, args, mode, rate):
    """The stack's floor (examples/cost_floor.rs): actix-web answering the
    same HTTP records from the same loadgen, with nothing of the gateway;
    `mode` "wal" also inserts each record into a bare SQLite table from one
    writer thread that group-commits over DEFAULT_WINDOW_MS and answers
    after the commit (the gateway's thread hops), "http" answers at once.
    Its CPU (a share of one core) and device ack p99 (ms)."""
    work = ctx.run_dir / f"stack-{mode}-{rate}"
    work.mkdir(parents=True, exist_ok=True)
    port = chaos.free_port()
    proc = chaos.CHILDREN.spawn([ctx.floor_bin, f"127.0.0.1:{port}", mode, work / "floor.db", DEFAULT_WINDOW_MS],
                                work / "floor.log")
    ready = f"http://127.0.0.1:{port}/readyz"

    def up():
        if proc.poll() is not None:
            raise chaos.ChaosFailure(f"cost_floor exited: {chaos.tail(work / 'floor.log', 5)}")
        try:
            with urllib.request.urlopen(ready, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        chaos.wait_for("cost_floor to be ready", 30, up, 0.05)
        load = loadgen(ctx, work, "http", f"http://127.0.0.1:{port}", rate, args.warmup + args.secs + 2,
                       f"floor{mode}", 50)
        load.start()
        time.sleep(args.warmup)
        t0, c0 = time.monotonic(), thread_cpu_ns(proc.pid)
        time.sleep(args.secs)
        t1, c1 = time.monotonic(), thread_cpu_ns(proc.pid)
        summary = load.finish(30)
        if proc.poll() is not None or not set(c0) <= set(c1):
            raise chaos.ChaosFailure(f"cost_floor {mode} at {rate}/s: a thread ended while measuring")
        return {"mode": mode, "rate": rate, "cpu_pct": 100.0 * sum(c1[k] - c0[k] for k in c0) / 1e9 / (t1 - t0),
                "p99": (summary.get("latency_ms") or {}).get("p99")}
    finally:
        chaos.CHILDREN.stop_all()


def default_config(mqtt_port, window=None):
    wal = f'[wal]\ncommit_window = "{window}"\n' if window else ""
    return f'gateway_id = "cost"\n[mqtt]\nurl = "embedded"\nembedded_addr = "127.0.0.1:{mqtt_port}"\n{wal}'


def before_config(mqtt_port, work):
    """The default config as it was before issue 31 (its zero-config archive spelled out)."""
    return (default_config(mqtt_port) + '[wal]\nack_flush = "0s"\n[sinks.archive]\nkind = "s3"\n'
            f'url = "file://{work}/data/archive"\nmax_bytes = 1073741824\nbatch_max_wait_ms = 5\n')


def figure(name, value, unit, **kw):
    benchfig.figure(FIGURES, "bench-cost", name, value, unit, **kw)


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def pct(share):
    return None if share is None else 100 * share


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin-dir", default=str(ROOT / "target" / os.environ.get("BENCH_PROFILE", "dist")))
    ap.add_argument("--rates", default="40,1000")
    ap.add_argument("--secs", type=float, default=float(os.environ.get("BENCH_COST_SECS", 30)))
    ap.add_argument("--warmup", type=float, default=8)
    ap.add_argument("--runs", default="default-http,default-mqtt,before-http,five-http,steady-http,window")
    ap.add_argument("--windows", default="50ms,100ms,200ms")
    ap.add_argument("--prefill-secs", type=int, default=60)
    args = ap.parse_args()
    ctx = chaos.BenchCtx(args.bin_dir, "cost", "c")
    for p in (ctx.gateway_bin, ctx.loadgen_bin):
        if not p.exists():
            sys.exit(f"bench-cost: {p} is missing (make bench builds it)")
    rates = [int(r) for r in args.rates.split(",") if r.strip()]
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    perf = perf_works()
    build = os.popen(f"'{ctx.gateway_bin}' --version 2>/dev/null").read().strip() or None
    floors = {r: floor(ctx, args, r) for r in rates}
    rows, failures = [], []
    # The stack's floor at each rate: (rate, mode) -> figures.
    stack = {}
    ctx.floor_bin = Path(args.bin_dir).resolve() / "examples" / "cost_floor"
    if not ctx.floor_bin.exists():
        failures.append(f"stack floor: {ctx.floor_bin} is missing (make bench builds it)")
    else:
        for rate in rates:
            for mode in ("wal", "http"):
                try:
                    stack[(rate, mode)] = stack_floor(ctx, args, mode, rate)
                    chaos.log(f"cost: stack floor ({mode}) at {rate}/s: {stack[(rate, mode)]['cpu_pct']:.2f} % CPU")
                except (chaos.ChaosFailure, OSError, subprocess.SubprocessError) as e:
                    failures.append(f"stack floor ({mode}) at {rate}/s: {e}")

    def run(name, config, kind, rate, devices, prefill_secs=0):
        try:
            row = measure(ctx, args, name, config, kind, rate, perf, devices, prefill_secs)
            rows.append(row)
            chaos.log(f"cost: {name} at {rate}/s: {row['cpu_pct']:.1f} % CPU, {row['bytes']:.0f} B/record")
        except (chaos.ChaosFailure, OSError, subprocess.SubprocessError) as e:
            failures.append(f"{name} at {rate}/s: {e}")
            chaos.log(f"cost: {name} at {rate}/s failed: {e}")

    for rate in rates:
        if "default-http" in runs:
            args.mqtt_port = chaos.free_port()
            run("default-http", default_config(args.mqtt_port), "http", rate, 50)
        if "default-mqtt" in runs:
            args.mqtt_port = chaos.free_port()
            run("default-mqtt", default_config(args.mqtt_port), "mqtt", rate, 200)
        if "before-http" in runs:
            args.mqtt_port = chaos.free_port()
            run("before-http", before_config(args.mqtt_port, ctx.run_dir / f"before-http-{rate}"), "http", rate, 50)
        if "five-http" in runs:
            if chaos.TANSU.exists() and chaos.VENV_PY.exists():
                run("five-http", None, "http", rate, 50)
            else:
                failures.append("five-http: tansu or .venv-test missing (scripts/deps.sh test)")
    if "steady-http" in runs:
        args.mqtt_port = chaos.free_port()
        run("steady-http", default_config(args.mqtt_port), "http", rates[-1], STEADY_DEVICES, args.prefill_secs)
    if "window" in runs:
        for w in [w.strip() for w in args.windows.split(",") if w.strip()]:
            args.mqtt_port = chaos.free_port()
            run(f"window-{w}", default_config(args.mqtt_port, w), "http", rates[0], 50)

    lines = [
        "", f"### Cost per record (scripts/bench-cost.py, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())})", "",
        f"{build or ctx.gateway_bin}; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end. "
        f"Each run: a fresh gateway, loadgen at a steady rate, measured over {args.secs:.0f} s after {args.warmup:.0f} s "
        "of warm-up: CPU from the threads' run time (/proc/PID/task/*/schedstat), bytes from /proc/PID/io "
        "(`write_bytes`: bytes sent to the storage layer); "
        + (f"fsyncs counted by `perf stat -p` over the {FSYNC_SECS} s after (not while CPU is measured: it costs CPU)."
           if perf else "no fsync count (perf cannot count syscalls here)."), "",
        "Floor (same run): bare SQLite, one 400-byte record per commit, WAL mode, synchronous=FULL, no index: "
        + ", ".join(f"{f['rate']}/s: **{f['bytes']:.0f} B** and {f['syscw']:.1f} write syscalls a record, "
                    f"{f['cpu_pct']:.2f} % of a core" for f in floors.values()),
        "",
        "Stack floor (same run, examples/cost_floor.rs): actix-web answering the same HTTP records from the same "
        "loadgen, with nothing of the gateway; with a bare SQLite insert from one writer thread that group-commits "
        f"over {DEFAULT_WINDOW_MS} ms (the default `wal.commit_window`) and answers after the commit: "
        + ", ".join(f"{r}/s: **{f['cpu_pct']:.2f} %** of a core (ack p99 {fmt(f['p99'], '.1f')} ms)"
                    for (r, m), f in stack.items() if m == "wal")
        + "; answering at once, with no SQLite: "
        + ", ".join(f"{r}/s: {f['cpu_pct']:.2f} %" for (r, m), f in stack.items() if m == "http"),
        "",
        "| run | rate | gateway CPU | CPU per record | written per record | vs floor | write syscalls | fsyncs | WAL commits/s | ack p50 / p99 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        fl = floors.get(r["rate"])
        vs = r["bytes"] / fl["bytes"] if fl and fl["bytes"] else None
        run = f"{r['run']} ({r['prefilled']:,} records in the WAL)" if r["prefilled"] else r["run"]
        lines.append(f"| {run} | {r['rate']}/s | {r['cpu_pct']:.2f} % | {r['cpu_us']:.0f} µs | {r['bytes']:.0f} B "
                     f"| {fmt(vs, '.2f')}× | {r['syscw']:.1f} | {fmt(r['fsyncs'], '.2f')} | {r['commits_s']:.0f} "
                     f"| {fmt(r['p50'], '.1f')} / {fmt(r['p99'], '.1f')} ms |")
    lines += ["", "Receive → sink acknowledgement p99 (`gateway_e2e_latency_seconds`, same window):", ""]
    lines += [f"- {r['run']} at {r['rate']}/s: " + ", ".join(
        f"{s} {fmt(v, '.0f')} ms ({fmt(pct(r['sink_within_50ms'].get(s)), '.2f')} % within 50 ms)"
        for s, v in r["sink_p99"].items()) for r in rows if r["sink_p99"]]
    lines += [f"- FAILED: {f}" for f in failures]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

    lo, hi = (rates[0], rates[-1]) if rates else (None, None)
    for r in rows:
        fl = floors.get(r["rate"])
        key = f"cost.{r['run']}.{r['rate']}"
        note = f"{r['records']} records in {r['secs']:.0f} s; ack p99 {fmt(r['p99'], '.1f')} ms"
        if r["prefilled"]:
            note += f"; after a fill of {r['prefilled']:,} records from {STEADY_DEVICES} devices"
        sf = stack.get((r["rate"], "wal"))
        cpu_note = note if sf is None else f"{note}; the stack floor at this rate: {sf['cpu_pct']:.2f} % of a core"
        default = r["run"] in ("default-http", "default-mqtt")
        window = r["run"].startswith("window-")
        if default and r["rate"] == lo:
            figure(f"{key}.cpu", round(r["cpu_pct"], 3), "% of a core", target="<= 1 % of a core at 40 records/s (issue 31)",
                   check="value <= 1", note=cpu_note, build=build)
        elif default and r["rate"] == hi:
            figure(f"{key}.cpu", round(r["cpu_pct"], 3), "% of a core", target="<= 15 % of a core at 1,000 records/s (issue 31)",
                   check="value <= 15", note=cpu_note, build=build)
        else:
            figure(f"{key}.cpu", round(r["cpu_pct"], 3), "% of a core", note=cpu_note, build=build)
        if fl and default and r["rate"] == lo:
            figure(f"{key}.bytes", round(r["bytes"]), "B/record", ceiling=("bare SQLite, 1 record a commit", round(fl["bytes"])),
                   target="<= 1.0 x the bare-SQLite floor at 40 records/s (issue 31)", check="ratio <= 1.0", note=note, build=build)
        elif default and r["rate"] == hi:
            figure(f"{key}.bytes", round(r["bytes"]), "B/record", target="<= 1.5 KB a record at 1,000 records/s (issue 31)",
                   check="value <= 1500", note=note, build=build)
        else:
            figure(f"{key}.bytes", round(r["bytes"]), "B/record", note=note, build=build)
        if r["p99"] is not None and (default or window):
            limit = 250 if window else 50
            figure(f"{key}.ack_p99", r["p99"], "ms", target=f"device ack p99 <= {limit} ms (issue 31)",
                   check=f"value <= {limit}", note=note, build=build)
        cloud = r["sink_p99"].get("cloud")
        within = pct(r["sink_within_50ms"].get("cloud"))
        if r["run"] == "five-http" and r["rate"] == hi and within is not None:
            # p99 <= 50 ms is 99 % within 50 ms: read off the 50 ms bucket
            # (the interpolated p99 is in the note).
            figure(f"{key}.mqtt_sink_within_50ms", round(within, 2), "% of records",
                   target="MQTT sink receive -> ack p99 <= 50 ms at 1,000 records/s (issue 31): >= 99 % within 50 ms",
                   check="value >= 99", note=f"{note}; interpolated p99 {fmt(cloud, '.1f')} ms", build=build)
    # The target is for a documented setting, not for each: the one with
    # the fewest bytes among those that keep the device ack p99 <= 250 ms.
    windows = [r for r in rows if r["run"].startswith("window-") and r["p99"] is not None and r["p99"] <= 250]
    if windows:
        best = min(windows, key=lambda r: r["bytes"])
        figure(f"cost.window.{best['rate']}.best_bytes", round(best["bytes"]), "B/record",
               target="<= 3 KB a record at 40 records/s with a documented setting, ack p99 <= 250 ms (issue 31)",
               check="value <= 3000", build=build,
               note=f"{best['run']} (of {', '.join(r['run'] for r in windows)}): ack p99 {fmt(best['p99'], '.1f')} ms")
    for fl in floors.values():
        figure(f"cost.floor.{fl['rate']}.bytes", round(fl["bytes"]), "B/record",
               note="bare SQLite: one 400-byte record per commit, WAL, synchronous=FULL, rowid table, no index", build=build)
        figure(f"cost.floor.{fl['rate']}.cpu", round(fl["cpu_pct"], 3), "% of a core",
               note="the same bare SQLite loop in Python: its insert + commit (fsync) per record", build=build)
    for (rate, mode), f in stack.items():
        what = ("actix-web + a bare SQLite writer thread, groups over the default commit window" if mode == "wal"
                else "actix-web answering at once, no SQLite")
        figure(f"cost.stack-floor-{mode}.{rate}.cpu", round(f["cpu_pct"], 3), "% of a core",
               note=f"examples/cost_floor.rs {mode}: {what}; ack p99 {fmt(f['p99'], '.1f')} ms", build=build)
    return 1 if failures else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sys.exit(main())
    finally:
        chaos.CHILDREN.stop_all()

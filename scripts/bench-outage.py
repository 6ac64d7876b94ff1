#!/usr/bin/env python3
"""Memory and duplicates through an upstream outage (`make bench`; issue 12).

    scripts/bench-outage.py [--bin-dir DIR] [--modes embedded,mosquitto]
                            [--rate 400] [--outage-secs 20] [--before-secs 15] [--after-secs 25]

For each ingest mode (the embedded broker, the default; an external
Mosquitto): the release gateway with one `mqtt` sink to a cloud Mosquitto
(persistence on, a QoS 1 subscriber on a persistent session), `loadgen`
publishing QoS 1 at --rate records/s over 10 device connections. After
--before-secs the cloud broker is stopped (SIGTERM: connection refused) for
--outage-secs and started again; the load goes on throughout. Then the
gateway drains and the chaos checker (scripts/chaos.py) compares every
acknowledged id with what the subscriber received.

Figures, per mode: the gateway's peak RSS (VmHWM; target <= 60 MB), RSS
sampled every 100 ms (before the outage, its peak during the outage and
drain, at the end), the backlog the outage built (records acknowledged while
the broker was down), the duplicates the subscriber saw as a share of that
backlog (target <= 1 %), the records lost (must be 0) and the drain time.

Appends a section to bench/results/latest.md and one JSON line per figure to
bench/results/figures.jsonl (scripts/bench-report.py). Exit status 1 when a
record was lost or a run failed.
"""

import argparse
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchfig  # noqa: E402  one figure line for bench-report.py
import chaos  # noqa: E402  the rig, the gateway, loadgen and the checker

ROOT = chaos.ROOT
RESULTS = ROOT / "bench/results/latest.md"
FIGURES = Path(os.environ.get("BENCH_FIGURES", ROOT / "bench/results/figures.jsonl"))


def status_kb(pid, field):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class Sampler(threading.Thread):
    """VmRSS of a process every 100 ms, with the phase it was taken in."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.phase, self.samples, self.done = pid, "before", [], threading.Event()

    def run(self):
        while not self.done.wait(0.1):
            kb = status_kb(self.pid, "VmRSS")
            if kb is not None:
                self.samples.append((self.phase, kb))

    def peak(self, *phases):
        values = [kb for phase, kb in self.samples if phase in phases]
        return max(values) / 1024 if values else None


def run_mode(ctx, args, mode):
    work = ctx.run_dir / mode
    rig = chaos.Rig(work, sinks=("cloud",), ingest=mode).start()
    gw = chaos.Gateway(ctx, work, rig.config())
    gw.start()
    pid = gw.pid()
    idle = status_kb(pid, "VmRSS") / 1024
    secs = args.before_secs + args.outage_secs + args.after_secs
    load = chaos.Loadgen(ctx, work, "mqtt", rig.mqtt_url(), args.rate, secs, "mqtt", 10).start()
    sampler = Sampler(pid)
    sampler.start()
    t0 = time.monotonic()
    time.sleep(args.before_secs)
    acked_before = count_lines(load.acked)
    sampler.phase = "outage"
    chaos.log(f"outage[{mode}]: cloud broker stopped for {args.outage_secs}s")
    rig.servers["cloud"].outage("killed")
    time.sleep(args.outage_secs)
    acked_during = count_lines(load.acked) - acked_before
    rig.servers["cloud"].recover("killed")
    back = time.monotonic()
    sampler.phase = "drain"
    chaos.log(f"outage[{mode}]: cloud broker back; {acked_during} records acknowledged while it was down")

    def drained():
        gw.check_alive()
        return chaos.backlog_gone(gw, "cloud")
    chaos.wait_for("the cloud backlog to drain", 300, drained, 0.2)
    drain_secs = time.monotonic() - back
    sampler.phase = "after"
    load.finish(secs + 60)
    res = chaos.Result(f"outage-{mode}")
    chaos.check(ctx, res, gw, rig, [load.acked], stop_gateway=False)
    sampler.done.set()
    hwm = status_kb(pid, "VmHWM") / 1024
    end = status_kb(pid, "VmRSS") / 1024
    chaos.finish_gateway(res, gw)
    chaos.CHILDREN.stop_all()
    return {
        "mode": mode, "acked": res.acked, "lost": res.lost.get("cloud"), "dups": res.dups.get("cloud"),
        "backlog": acked_during, "drain_s": drain_secs, "idle_mb": idle, "hwm_mb": hwm, "end_mb": end,
        "before_peak_mb": sampler.peak("before"), "outage_peak_mb": sampler.peak("outage", "drain"),
        "failures": res.failures + [n for n in res.notes if "missing" in n], "secs": time.monotonic() - t0,
        "status": res.status,
    }


def count_lines(path):
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def figure(name, value, unit, **kw):
    benchfig.figure(FIGURES, "bench-outage", name, value, unit, **kw)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin-dir", default=str(ROOT / "target" / os.environ.get("BENCH_PROFILE", "dist")))
    ap.add_argument("--modes", default="embedded,mosquitto")
    ap.add_argument("--rate", type=int, default=400)
    ap.add_argument("--outage-secs", type=int, default=20)
    ap.add_argument("--before-secs", type=int, default=15)
    ap.add_argument("--after-secs", type=int, default=25)
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir")
    args = ap.parse_args()
    ctx = chaos.BenchCtx(args.bin_dir, "outage", "o")
    chaos.preflight(ctx)
    build = os.popen(f"'{ctx.gateway_bin}' --version 2>/dev/null").read().strip() or None
    rows = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        try:
            rows.append(run_mode(ctx, args, mode))
        except chaos.ChaosFailure as e:
            rows.append({"mode": mode, "status": "FAIL", "failures": [str(e)]})
        finally:
            chaos.CHILDREN.stop_all()
    lines = [
        "", f"### Upstream outage: memory and duplicates (scripts/bench-outage.py, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())})", "",
        f"{build or ctx.gateway_bin}; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end.",
        f"MQTT QoS 1 at {args.rate} records/s (loadgen, 10 devices) into the gateway; one `mqtt` sink (v5) to a cloud "
        f"Mosquitto with persistence, stopped (SIGTERM) {args.before_secs} s in for {args.outage_secs} s, then started "
        "again; a QoS 1 subscriber on a persistent session counts what arrives. RSS sampled every 100 ms.", "",
        "| ingest | acknowledged | backlog from the outage | lost | duplicates (of the backlog) | drain after recovery "
        "| RSS idle / before / outage+drain peak / end | peak (VmHWM) | result |",
        "|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    failed = False
    for r in rows:
        if r["status"] != "PASS" or "acked" not in r:
            failed = True
            lines.append(f"| {r['mode']} | - | - | - | - | - | - | - | FAIL: {'; '.join(r['failures'])} |")
            continue
        share = 100.0 * r["dups"] / r["backlog"] if r["backlog"] else 0.0
        lines.append(
            f"| {r['mode']} | {r['acked']} | {r['backlog']} | {r['lost']} | {r['dups']} ({share:.2f} %) | {r['drain_s']:.1f} s "
            f"| {r['idle_mb']:.1f} / {r['before_peak_mb']:.1f} / {r['outage_peak_mb']:.1f} / {r['end_mb']:.1f} MiB "
            f"| {r['hwm_mb']:.1f} MiB | {r['status']} |")
        mb = r["hwm_mb"] * 1.048576
        figure(f"outage.{r['mode']}.rss_peak", round(mb, 1), "MB",
               target="peak <= 60 MB in a 20 s upstream outage at 400 msg/s (issue 12, target 2)",
               check="value <= 60", note=f"VmHWM; {args.outage_secs} s outage at {args.rate} records/s", build=build)
        figure(f"outage.{r['mode']}.duplicates", round(share, 3), "% of backlog",
               target="<= 1 % duplicates of the backlog after an upstream outage (issue 12, target 1)",
               check="value <= 1", note=f"{r['dups']} duplicates over a backlog of {r['backlog']}", build=build)
        figure(f"outage.{r['mode']}.lost", r["lost"], "records", target="nothing lost", check="value == 0", build=build)
        figure(f"outage.{r['mode']}.drain", round(r["drain_s"], 2), "s",
               note=f"backlog of {r['backlog']} to the cloud broker after it came back", build=build)
        failed = failed or r["lost"] != 0
    text = "\n".join(lines) + "\n"
    print(text)
    if RESULTS.parent.exists():
        with open(RESULTS, "a") as f:
            f.write(text)
    if not failed and not args.keep and ctx.run_dir.exists():
        import shutil
        shutil.rmtree(ctx.run_dir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

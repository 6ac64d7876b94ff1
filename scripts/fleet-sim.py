#!/usr/bin/env python3
"""Fleet simulation behind `make fleet-sim` (issue 32; DESIGN §11).

One Mosquitto plays the fleet broker, a second one the cloud broker of each
gateway's `mqtt` sink `cloud`; N `gateway run` processes (own data dir, own
free port, gateway_id gw-000…, group `sim`, probation 10 s) each take a
light HTTP load from `loadgen` (--acked file). Scenarios, in order, on the
same fleet:

  good      bundle 1 (a new s3 sink `extra` with a route, and a priority
            rule) rolled out with `gateway fleet rollout --waves
            1,10%,50%,100%`: every member reports it active.
  forged    unsigned, tampered, older-version and replayed bundle.apply
            commands on the group topic: every member refuses each one
            (unsigned, bad_signature, stale_version, replayed).
  bad       bundle 2 points sink `cloud` at a refused port: the rollout stops
            after wave 1, whose member(s) report rolled_back.
  kill9     bundle 3 to one member, kill -9 during its probation, restart:
            it reports rolled_back ("crashed during probation") and runs
            bundle 1 again.
  broker    bundle 4 rolled out while the fleet broker is restarted after
            wave 1 is sent: the rollout finishes, every member active.
  loss      the loads stop, every gateway drains: every acknowledged record
            is in its archive (what the sinks got vs loadgen --acked).
  cost      fleet traffic of the idle fleet (state messages on the broker)
            and the RSS of a gateway with and without the fleet channel.

Results: bench/results/fleet-latest.md (--out); exit 1 if a scenario failed.
Reuses scripts/chaos.py (child processes, Mosquitto, Gateway, waits).
"""

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chaos  # noqa: E402
from chaos import CHILDREN, ChaosFailure, Gateway, Mosquitto, log, wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROBATION = 10  # --probation


class Ctx:
    def __init__(self, args):
        bin_dir = Path(args.bin_dir).resolve()
        self.gateway_bin = bin_dir / "gateway"
        self.loadgen_bin = bin_dir / "loadgen"
        self.n = args.n
        self.work = Path(args.work or f"/tmp/fleet-sim-{os.getpid()}")
        self.work.mkdir(parents=True, exist_ok=True)
        self.run_tag = time.strftime("%H%M%S")


def run(cmd, timeout=60, check=True):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise ChaosFailure(f"{' '.join(map(str, cmd[:4]))}… failed ({p.returncode}): {p.stderr[-600:]}")
    return p


def pct(values, q):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]


class Sim:
    def __init__(self, ctx):
        self.ctx = ctx
        self.fleet = Mosquitto(ctx.work, "fleet-mosquitto")
        self.cloud = Mosquitto(ctx.work, "cloud-mosquitto")
        self.gws = []
        self.loads = []
        self.results = []  # (scenario, ok, text)
        self.figures = {}

    # ------------------------------------------------------------ set-up
    def start(self):
        for b in (self.fleet, self.cloud):
            b.start()
        keys = self.ctx.work / "keys"
        if not (keys / "ops.key").exists():
            run([self.ctx.gateway_bin, "fleet", "keygen", "--out", keys, "--key-id", "ops"])
        self.key = keys / "ops.key"
        self.trusted = keys / "ops.pub"
        self.replies = self.ctx.work / "replies.txt"
        self.sub = CHILDREN.spawn(["mosquitto_sub", "-h", "127.0.0.1", "-p", self.fleet.port, "-q", "1",
                                   "-v", "-t", "fleet/+/reply/#"], self.replies)
        log(f"starting {self.ctx.n} gateways")
        for i in range(self.ctx.n):
            gid = f"gw-{i:03d}"
            work = self.ctx.work / gid
            work.mkdir(parents=True, exist_ok=True)
            gw = Gateway(self.ctx, work, self.config(gid, work))
            gw.gid = gid
            gw.start()
            self.gws.append(gw)
        wait_for("every gateway on the fleet broker", 120, lambda: len(self.states()) == self.ctx.n, 1)
        for gw in self.gws:
            lg = chaos.Loadgen(self.ctx, gw.work, "http", f"http://127.0.0.1:{gw.port}", 5, 7200,
                               gw.gid, 2)
            lg.args = [a for a in lg.args if a not in ("--connections", 8)] + ["--connections", 1]
            self.loads.append(lg.start())

    def config(self, gid, work, fleet=True):
        fleet_toml = (f'[fleet]\nurl = "mqtt://127.0.0.1:{self.fleet.port}"\ngroups = ["sim"]\n'
                      f'trusted_keys_file = "{self.trusted}"\nprobation = "{PROBATION}s"\n') if fleet else ""
        return (f'gateway_id = "{gid}"\n[mqtt]\nurl = "off"\n{fleet_toml}'
                f'[sinks.archive]\nkind = "s3"\nurl = "file://{work}/archive"\nbatch_max_wait_ms = 200\n'
                f'[sinks.cloud]\nkind = "mqtt"\nurl = "mqtt://127.0.0.1:{self.cloud.port}"\n'
                f'topic_prefix = "cloud"\n{chaos.SINK_TUNING}')

    def broker_args(self):
        return ["--url", f"mqtt://127.0.0.1:{self.fleet.port}"]

    def states(self):
        p = run([self.ctx.gateway_bin, "--json", "fleet", "status", *self.broker_args(), "--group", "sim",
                 "--wait", "1s"], timeout=60, check=False)
        try:
            return {s["gateway_id"]: s for s in json.loads(p.stdout) if s.get("online")}
        except ValueError:
            return {}

    def store(self, gw):
        try:
            return json.loads((gw.data / "bundles" / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    def rollout(self, version, settings, waves, max_failures, during=None):
        f = self.ctx.work / f"bundle-{version}.json"
        f.write_text(json.dumps({"version": version, "settings": settings}))
        out, err = self.ctx.work / f"rollout-{version}.out", self.ctx.work / f"rollout-{version}.err"
        t0 = time.monotonic()
        with open(out, "w") as o, open(err, "w") as e:
            p = subprocess.Popen([str(c) for c in [
                self.ctx.gateway_bin, "--json", "fleet", "rollout", *self.broker_args(), "--group", "sim",
                "--bundle", f, "--key", self.key, "--waves", waves, "--max-failures", max_failures,
                "--timeout", "120s", "--wait", "2s"]], stdout=o, stderr=e)
            done = False
            while p.poll() is None:
                if during and not done:
                    done = during(err.read_text())
                if time.monotonic() - t0 > 1800:
                    p.kill()
                    raise ChaosFailure("the rollout did not end within 30 min")
                time.sleep(0.2)
        rows = [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]
        return p.returncode, rows, err.read_text(), time.monotonic() - t0

    def record(self, name, fn):
        log(f"scenario {name}")
        try:
            text = fn()
            self.results.append((name, True, text))
            log(f"{name}: PASS {text}")
        except (ChaosFailure, AssertionError, subprocess.TimeoutExpired) as e:
            self.results.append((name, False, str(e)[-800:]))
            log(f"{name}: FAIL {e}")

    # --------------------------------------------------------- scenarios
    def good(self):
        # One directory for all: the object keys carry the gateway id.
        settings = {"sinks": {"extra": {"kind": "s3", "url": f"file://{self.ctx.work}/extra",
                                        "route": {"metrics_any": ["temperature_c", "t"]}}},
                    "priority": [{"class": "high", "match": {"metrics_any": ["alarm"]}}]}
        rc, rows, err, secs = self.rollout(1, settings, "1,10%,50%,100%", 0)
        assert rc == 0, f"rollout exit {rc}: {err[-600:]}"
        bad = [r for r in rows if not r["ok"]]
        assert not bad and len(rows) == self.ctx.n, f"{bad[:5]} ({len(rows)} rows)"
        times = [r["seconds"] for r in rows]
        self.figures["good_p50"] = pct(times, 0.5)
        self.figures["good_p99"] = pct(times, 0.99)
        self.figures["good_total"] = secs
        missing = [gw.gid for gw in self.gws if self.store(gw).get("active") != 1]
        assert not missing, f"not on bundle 1: {missing}"
        return (f"{len(rows)} members active; time to active after send p50 {self.figures['good_p50']:.1f}s "
                f"p99 {self.figures['good_p99']:.1f}s (probation {PROBATION}s included); rollout {secs:.0f}s")

    def forged(self):
        def sign(version, extra=None):
            p = run([self.ctx.gateway_bin, "fleet", "sign", "--group", "sim", "--key", self.key,
                     "bundle.apply", json.dumps({"version": version, "settings": {"log": {"level": "info"}}})])
            env = json.loads(p.stdout)
            if extra:
                extra(env)
            return env
        unsigned = sign(50, lambda e: (e.pop("signature"), e.pop("key_id")))
        tampered = sign(50, lambda e: e["args"]["settings"]["log"].update(level="debug"))
        older = sign(1)
        cases = [("unsigned", unsigned, "unsigned"), ("tampered", tampered, "bad_signature"),
                 ("older-version", older, "stale_version"), ("replayed", older, "replayed")]
        lines = []
        for name, env, want in cases:
            before = self.replies.read_text().count("\n") if self.replies.exists() else 0
            run(["mosquitto_pub", "-h", "127.0.0.1", "-p", self.fleet.port, "-q", "1",
                 "-t", "fleet/group/sim/control/bundle.apply", "-m", json.dumps(env)])
            rid = env["request_id"]

            def answers():
                got = {}
                for line in self.replies.read_text().splitlines()[before:]:
                    topic, _, payload = line.partition(" ")
                    if topic.endswith(f"/reply/{rid}"):
                        got[topic.split("/")[1]] = json.loads(payload)
                return got if len(got) == self.ctx.n else None
            got = wait_for(f"{self.ctx.n} replies to the {name} bundle", 60, answers, 0.3)
            wrong = {g: r.get("error") for g, r in got.items() if r.get("ok") or r.get("error") != want}
            assert not wrong, f"{name}: {wrong}"
            lines.append(f"{name}: {len(got)}/{self.ctx.n} refused {want}")
        self.figures["forged"] = lines
        changed = [gw.gid for gw in self.gws if self.store(gw).get("active") != 1]
        assert not changed, f"a forged bundle changed {changed}"
        return "; ".join(lines)

    def bad(self):
        settings = {"sinks": {"cloud": {"url": f"mqtt://127.0.0.1:{chaos.free_port()}"}}}
        rc, rows, err, _ = self.rollout(2, settings, "1,10%,50%,100%", 0)
        assert rc != 0, "the rollout did not stop"
        wave1 = [r for r in rows if r["wave"] == 1]
        assert wave1 and all("rolled_back" in r["result"] for r in wave1), wave1
        others = [r for r in rows if r["wave"] > 1 and r["result"] != "not sent"]
        assert not others, f"members after wave 1 got it: {others[:5]}"
        never = [gw.gid for gw in self.gws[len(wave1):] if self.store(gw).get("version") == 2]
        assert not never, never
        back = [self.store(gw) for gw in self.gws[:len(wave1)]]
        assert all(s.get("active") == 1 and s.get("status") == "rolled_back" for s in back), back
        secs = [r["seconds"] for r in wave1]
        self.figures["bad_rollback"] = max(secs)
        assert max(secs) <= PROBATION + 5 + 1, f"rollback took {max(secs)}s"
        return (f"stopped after wave 1 ({len(wave1)} member(s) rolled back in ≤{max(secs):.1f}s of send, "
                f"reason: {wave1[0]['result'][:80]})")

    def kill9(self):
        gw = self.gws[-1]
        env = run([self.ctx.gateway_bin, "fleet", "sign", "--gateway", gw.gid, "--key", self.key,
                   "bundle.apply", json.dumps({"version": 3, "settings": {"log": {"level": "info"}}})]).stdout
        run(["mosquitto_pub", "-h", "127.0.0.1", "-p", self.fleet.port, "-q", "1",
             "-t", f"fleet/{gw.gid}/control/bundle.apply", "-m", env.strip()])
        wait_for("bundle 3 on probation", 60, lambda: self.store(gw).get("status") == "probation", 0.1)
        gw.kill9()
        gw.start()
        s = wait_for("the rollback at start", 30, lambda: self.store(gw).get("status") == "rolled_back"
                     and self.store(gw), 0.2)
        assert s.get("active") == 1 and s.get("reason") == "crashed during probation", s
        st = wait_for("the retained state reporting it", 60,
                      lambda: (self.states().get(gw.gid) or {}).get("bundle", {}).get("status") == "rolled_back"
                      and self.states()[gw.gid], 1)
        # The acked file of its loadgen keeps growing after the restart.
        return f"{gw.gid}: {st['bundle']}"

    def broker(self):
        restarted = {"at": None}

        def during(err):
            if "wave 2/" in err and restarted["at"] is None:
                log("restarting the fleet broker mid-rollout")
                self.fleet.stop()
                time.sleep(1)
                self.fleet.start()
                restarted["at"] = time.monotonic()
            return restarted["at"] is not None
        settings = {"priority": [{"class": "high", "match": {"metrics_any": ["alarm", "fault"]}}]}
        rc, rows, err, secs = self.rollout(4, settings, "1,10%,50%,100%", 0, during)
        assert restarted["at"], "the broker was never restarted"
        assert rc == 0, f"rollout exit {rc}: {err[-800:]}"
        missing = [gw.gid for gw in self.gws if self.store(gw).get("active") != 4]
        assert not missing, f"not on bundle 4: {missing}"
        return f"rollout finished in {secs:.0f}s across a fleet broker restart; {len(rows)} members active"

    def loss(self):
        for lg in self.loads:
            lg.stop()
        lost, acked_total = {}, 0
        for gw in self.gws:
            chaos.wait_drained(gw, 120)
            acked = chaos.read_acked([gw.work / f"acked-{gw.gid}.txt"])
            acked_total += len(acked)
            have = set()
            for f in (gw.work / "archive").rglob("*.ndjson.gz"):
                have.update(chaos.KEY_RE.findall(gzip.decompress(f.read_bytes()).decode()))
            missing = acked - have
            if missing:
                lost[gw.gid] = len(missing)
        self.figures["acked"] = acked_total
        assert acked_total > 0, "nothing was acknowledged"
        assert not lost, f"lost: {lost}"
        return f"{acked_total} acknowledged records, all in the archives (0 lost)"

    def cost(self, idle_secs):
        out = self.ctx.work / "idle-states.txt"
        sub = CHILDREN.spawn(["mosquitto_sub", "-h", "127.0.0.1", "-p", self.fleet.port, "-v",
                              "-t", "fleet/+/state"], out)
        time.sleep(2)  # the retained ones arrive first
        start_bytes = out.stat().st_size if out.exists() else 0
        time.sleep(idle_secs)
        CHILDREN.stop(sub)
        total = out.stat().st_size - start_bytes
        per5 = total / self.ctx.n * (300 / idle_secs)
        self.figures["idle_bytes_per_5min"] = per5
        # RSS: one gateway with the fleet channel, one without, both idle.
        rss = {}
        for fleet in (False, True):
            work = self.ctx.work / f"rss-{'fleet' if fleet else 'nofleet'}"
            work.mkdir(parents=True, exist_ok=True)
            g = Gateway(self.ctx, work, self.config("rss-probe", work, fleet))
            g.start()
            time.sleep(8)
            rss[fleet] = int([line for line in Path(f"/proc/{g.pid()}/status").read_text().splitlines()
                              if line.startswith("VmRSS")][0].split()[1])
            g.stop()
        self.figures["rss_kb"] = rss
        return (f"idle state traffic {per5:.0f} B per gateway per 5 min (payload+topic over {idle_secs}s, "
                f"extrapolated); RSS {rss[False]} kB without fleet, {rss[True]} kB with (+{rss[True] - rss[False]} kB)")


def write_results(sim, path, started):
    f = sim.figures
    lines = [
        "# Fleet simulation (`make fleet-sim`)", "",
        f"- {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; N = {sim.ctx.n} gateways; probation {PROBATION}s; "
        f"debug binaries {sim.ctx.gateway_bin}; run {time.monotonic() - started:.0f}s",
        "", "| scenario | result | details |", "|---|---|---|"]
    for name, ok, text in sim.results:
        lines.append(f"| {name} | {'PASS' if ok else 'FAIL'} | {text.replace('|', '/')} |")
    lines += ["", "## Targets", ""]
    if f.get("good_p50") is not None:
        lines.append(f"- time to `active` after a wave is sent: p50 {f['good_p50']:.1f}s, p99 {f['good_p99']:.1f}s "
                     f"including the {PROBATION}s probation (p50 {f['good_p50'] - PROBATION:.1f}s, p99 "
                     f"{f['good_p99'] - PROBATION:.1f}s without; target ≤ 30 s)")
    if f.get("bad_rollback") is not None:
        lines.append(f"- bad bundle: back on the previous bundle ≤ {f['bad_rollback']:.1f}s after it was sent "
                     f"(target ≤ probation + 5 s = {PROBATION + 5}s)")
    if f.get("idle_bytes_per_5min") is not None:
        lines.append(f"- idle fleet traffic: {f['idle_bytes_per_5min']:.0f} B per gateway per 5 min of state "
                     "messages (plus MQTT keep-alive pings, 4 B each; target ≤ 2 KB)")
    if f.get("rss_kb"):
        r = f["rss_kb"]
        lines.append(f"- RSS with the fleet channel on: +{r[True] - r[False]} kB ({r[False]} → {r[True]} kB, "
                     "one idle gateway each, 8 s after ready; target ≤ 2 MB)")
    for line in f.get("forged", []):
        lines.append(f"- forged: {line}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")
    log(f"results in {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--bin-dir", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target")),
                                                      "debug"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/fleet-latest.md"))
    ap.add_argument("--idle-secs", type=int, default=300)
    ap.add_argument("--probation", type=int, default=10, help="seconds")
    ap.add_argument("--work")
    args = ap.parse_args()
    global PROBATION
    PROBATION = args.probation
    ctx = Ctx(args)
    for b in (ctx.gateway_bin, ctx.loadgen_bin):
        if not b.exists():
            sys.exit(f"fleet-sim: {b} is missing (cargo build --bins)")
    started = time.monotonic()
    sim = Sim(ctx)
    try:
        sim.start()
        for name in ("good", "forged", "bad", "kill9", "broker", "loss"):
            sim.record(name, getattr(sim, name))
        sim.record("cost", lambda: sim.cost(args.idle_secs))
    except (ChaosFailure, KeyboardInterrupt) as e:
        sim.results.append(("set-up", False, str(e)))
        log(f"fleet-sim: {e}")
    finally:
        CHILDREN.stop_all()
        write_results(sim, args.out, started)
    failed = [n for n, ok, _ in sim.results if not ok]
    log(f"fleet-sim: {'FAILED: ' + ', '.join(failed) if failed else 'all scenarios passed'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Fault harness behind `make chaos` (scripts/chaos.sh runs it).

Real servers, real binaries, real faults: the gateway (`gateway run`) with
five sinks of the four kinds (`archive`: files, and `lake`: S3 on moto, both
kind s3; `api`: tests/support/analytics_server.py; `cloud`: a second
Mosquitto read by mosquitto_sub; `events`: Kafka on tansu), device load from
`loadgen` (MQTT through an ingest Mosquitto, and HTTP), one fault at a time. Every scenario ends
with the same check (`check`): wait until the gateway has drained (every
sink's enqueued + inflight is 0 and ingest has stopped moving), read every
sink's far side, and compare with what was acknowledged to the devices (the
union of loadgen's --acked files):

    lost       = acknowledged ids missing at a sink's far side  (must be 0)
    duplicates = far-side records - distinct far-side records   (reported)

then stop the gateway with SIGTERM and run the offline `gateway wal check`
(must be clean).

Scenarios (`--only NAME,...`; quick / full scale):

  crash_loop      mixed MQTT + HTTP load at a fixed rate, all sinks; N cycles
                  of: wait 1-4 s (random, --seed), kill -9 the gateway, restart
                  it on the same data dir and port (10 / 100 cycles).
  sink_outages    a baseline phase, then outage phases while the load runs:
                  "killed" (connection refused: tansu SIGKILL, cloud Mosquitto
                  SIGTERM, analytics server SIGKILL, then restarted) and
                  "frozen" (SIGSTOP, later SIGCONT). moto is only frozen:
                  killing it would lose its in-memory objects. Quick: one
                  ~10 s phase with two sinks killed at once, one with two
                  frozen; full: every kind for every sink, 10 min each.
                  Reports the receive -> ack p99 of the sinks NOT in outage
                  (gateway_e2e_latency_seconds deltas over the phase) against
                  the baseline (target: within 2x; reported, not asserted) and
                  each sink's drain time after recovery (until it holds no
                  record 1 s old: the load goes on meanwhile).
  broker_restart  SIGTERM + restart of the ingest Mosquitto (persistence on)
                  in the middle of the load: the gateway reconnects, no loss.
  disk_full       data dir on a 96 MiB tmpfs, wal.min_free_disk_bytes = 8 MiB,
                  a filler leaves ~4 MiB: HTTP 503 with Retry-After, MQTT
                  acks pause, the gateway stays up; the filler is deleted:
                  ingest resumes by itself; `wal check` clean; no loss.
  powercut        the data dir and the archive sink's objects on powercut-fs
                  (tools/powercut-fs: a FUSE filesystem of ours that keeps
                  every write in memory until fsync and, on a cut, forgets
                  what was not synced: file data, new files, renames and
                  unlinks whose directory was not fsynced). First a probe
                  (an unsynced write must be lost at a cut, or the scenario
                  proves nothing); then mixed load, all sinks; N cycles of:
                  config.set through the admin API (runtime.json), wait 1-4 s,
                  kill -9 the gateway, cut, check what remains (runtime.json
                  valid and holding the last acknowledged setting; every
                  archive object readable, none that survived an earlier cut
                  gone; `wal check` clean on a copy of the WAL), restart on it
                  (5 / 50 cuts). The gateway creates the data and archive
                  directories itself (they must survive the cuts too).
                  Needs root and /dev/fuse.
  soak            full scale only (or --only soak): 1 h at 2k msg/s with one
                  sink frozen for 10 min in the middle, once with the embedded
                  broker and once with Mosquitto (--soak-modes may add
                  http: HTTP only); RSS, fds, threads and WAL
                  size sampled every 10 s: first / before the outage / peak /
                  end, and whether they came back flat.

Every scenario prints one summary line; the results (hardware, commit, date,
one table row per scenario, details) go to --out. The exit status is non-zero
when any scenario fails (a loss, a crash, an unclean WAL, an expected
behaviour not seen).

usage: chaos.py --scale quick|full [--only NAME,...] [--bin-dir DIR]
                [--loadgen FILE] [--powercut-fs FILE] [--out FILE] [--seed N]
                [--keep] [--soak-secs N] [--outage-secs N]

Needs root for disk_full (mount -t tmpfs) and powercut (a FUSE mount).
Scratch dirs go under target/chaos-tmp/ (kept on failure or with --keep).
Stdlib only; the far-side readers (tests/support/s3_dump.py, a Kafka reader
below) and moto_server run in .venv-test. Every sink retries fast
(retry_max_ms 2000, circuit probes every 1 s, publish_timeout_ms 5000).
Test-server traps handled here: tansu 0.6 gets an index on its headers
table (else reading a topic back is quadratic) and the Kafka sink a publish
timeout longer than any Kafka outage (else tansu panics on the producer's
epoch bump); Mosquitto runs as root (else it cannot save its persistence).
"""

import argparse
import ctypes
import datetime
import gzip
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_PY = ROOT / ".venv-test/bin/python"
SUPPORT = ROOT / "tests/support"
TMP_BASE = ROOT / "target/chaos-tmp"
TANSU = Path.home() / ".cargo/bin/tansu"
if not TANSU.exists() and shutil.which("tansu"):
    TANSU = Path(shutil.which("tansu"))
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
ALL_SINKS = ("archive", "lake", "api", "cloud", "events")
KEY_RE = re.compile(r'"idempotency_key":\s*"([^"]*)"')
MIB = 1024 * 1024

# The slowest far side reads back at least this many records/s: a read-back
# of n records gets 120 s + n / READ_PACE.
READ_PACE = 1000
# A Kafka read-back given longer than this goes to tansu's storage at once
# (tansu 0.6 fetches a large topic slower than READ_PACE).
MAX_KAFKA_READ_S = 900

# What a sink's batch does while its target is away: retried quickly, the
# circuit probes every second, a hung request gives up after 5 s.
SINK_TUNING = "retry_base_ms = 100\nretry_max_ms = 2000\ncircuit_cooldown_ms = 1000\npublish_timeout_ms = 5000\n"

# Reads a whole Kafka topic (every partition up to its end) and prints the
# idempotency-key header of each message, one a line. Run with .venv-test.
KAFKA_READER = r"""
import sys, time, uuid
from confluent_kafka import Consumer, KafkaError, TopicPartition, OFFSET_BEGINNING
brokers, topic, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
c = Consumer({"bootstrap.servers": brokers, "group.id": "chaos-" + uuid.uuid4().hex,
              "enable.auto.commit": False, "enable.partition.eof": True})
parts = sorted(c.list_topics(topic, timeout=30).topics[topic].partitions)
c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
left, deadline = set(parts), time.time() + timeout
out = sys.stdout
while left and time.time() < deadline:
    for m in c.consume(10000, 1.0):
        if m.error():
            if m.error().code() == KafkaError._PARTITION_EOF:
                left.discard(m.partition())
            continue
        key = dict(m.headers() or []).get("idempotency-key")
        out.write((key.decode() if key else "-") + "\n")
c.close()
if left:
    sys.exit(f"partitions {sorted(left)} not read to their end within {timeout}s")
"""


@dataclass
class Scale:
    name: str
    http_rate: int  # records/s over HTTP
    mqtt_rate: int  # records/s over MQTT (through the ingest broker)
    crash_cycles: int
    powercut_cycles: int  # power cuts (kill -9 + unsynced writes dropped + restart)
    outage_secs: int  # each outage phase, and the baseline before them
    outage_plan: list  # [(kind, [sinks])]
    broker_restarts: int
    disk_full_secs: int  # how long the disk stays full
    soak_secs: int
    soak_rate: int  # records/s in all, half MQTT half HTTP
    soak_outage_secs: int
    drain_timeout: int


QUICK = Scale(
    name="quick", http_rate=150, mqtt_rate=150, crash_cycles=10, powercut_cycles=5, outage_secs=10,
    outage_plan=[("killed", ["events", "cloud"]), ("frozen", ["lake", "api"])],
    broker_restarts=2, disk_full_secs=8,
    soak_secs=120, soak_rate=600, soak_outage_secs=30, drain_timeout=180)
FULL = Scale(
    name="full", http_rate=500, mqtt_rate=500, crash_cycles=100, powercut_cycles=50, outage_secs=600,
    outage_plan=[("killed", ["events"]), ("frozen", ["events"]),
                 ("killed", ["cloud"]), ("frozen", ["cloud"]),
                 ("killed", ["api"]), ("frozen", ["api"]),
                 ("frozen", ["lake"])],
    broker_restarts=10, disk_full_secs=60,
    soak_secs=3600, soak_rate=2000, soak_outage_secs=600, drain_timeout=900)


class ChaosFailure(Exception):
    """A scenario failed (a precondition, a timeout, an unexpected exit)."""


_T0 = time.monotonic()


def log(msg):
    print(f"==> [{time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for(what, timeout, cond, interval=0.2):
    """Polls `cond` until it returns something truthy; ChaosFailure after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise ChaosFailure(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def tail(path, lines=8):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def fmt_s(secs):
    return "-" if secs is None else f"{secs:.1f}s"


# ------------------------------------------------------------ child processes

_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent():
    _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: no orphan if the harness is killed


class Children:
    """Every process the harness starts, so that all are stopped after each
    scenario, on failure and on Ctrl-C; and the tmpfs mounts to undo."""

    def __init__(self):
        self.procs = []
        self.mounts = []

    def spawn(self, args, log_path, cwd=None, env=None):
        out = open(log_path, "ab")
        p = subprocess.Popen([str(a) for a in args], stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, cwd=cwd, env=env,
                             start_new_session=True, preexec_fn=_die_with_parent)
        out.close()
        self.procs.append(p)
        return p

    def stop(self, p, sig=signal.SIGTERM, timeout=20):
        """Stops one process (SIGCONT first, in case it is frozen); its exit status."""
        if p is None:
            return None
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGCONT)
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p in self.procs:
            self.procs.remove(p)
        return p.returncode

    def stop_all(self):
        procs, self.procs = self.procs[::-1], []
        for p in procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGCONT)
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        while self.mounts:
            unmount(self.mounts.pop())


CHILDREN = Children()


def mount_tmpfs(path, size):
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True, capture_output=True)
    CHILDREN.mounts.append(path)


def unmount(path):
    if os.path.ismount(path) and subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
    if path in CHILDREN.mounts:
        CHILDREN.mounts.remove(path)


# -------------------------------------------------------------------- servers

class Server:
    """A server of the test rig, run as a child process on a free loopback port."""

    can_kill = True  # a "killed" outage is possible without losing its data
    read_from_storage = False  # the check read its storage, not its API (Tansu.keys)
    kill_signal = signal.SIGKILL  # how a "killed" outage stops it

    def __init__(self, work, name):
        self.work = Path(work) / name
        self.work.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.port = free_port()
        self.log = self.work / f"{name}.log"
        self.proc = None

    def command(self):
        raise NotImplementedError

    def cwd(self):
        return None

    def spawn(self):
        self.proc = CHILDREN.spawn(self.command(), self.log, cwd=self.cwd())

    def wait_ready(self, timeout=60):
        def up():
            if self.proc.poll() is not None:
                raise ChaosFailure(f"{self.name} exited ({self.proc.returncode}): {tail(self.log)}")
            return port_open(self.port)
        wait_for(f"{self.name} to listen on {self.port}", timeout, up, 0.05)

    def start(self):
        self.spawn()
        self.wait_ready()

    def stop(self, sig=signal.SIGTERM):
        CHILDREN.stop(self.proc, sig)
        self.proc = None

    def freeze(self):
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self):
        os.kill(self.proc.pid, signal.SIGCONT)

    def outage(self, kind):
        if kind == "killed":
            self.stop(self.kill_signal)
        else:
            self.freeze()

    def recover(self, kind):
        if kind == "killed":
            self.start()
        else:
            self.thaw()


class Mosquitto(Server):
    """Mosquitto with persistence (the ingest broker or the cloud broker); a
    "killed" outage is SIGTERM, which makes it save its persistence file."""

    kill_signal = signal.SIGTERM

    def __init__(self, work, name):
        super().__init__(work, name)
        (self.work / "data").mkdir(exist_ok=True)
        self.conf = self.work / "mosquitto.conf"
        # As root it would switch to user mosquitto, which cannot write the
        # persistence dir: stay root (the repo's tests do the same).
        user = "user root\n" if os.geteuid() == 0 else ""
        self.conf.write_text(
            f"{user}listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"persistence true\npersistence_location {self.work / 'data'}/\n"
            "max_queued_messages 0\nmax_inflight_messages 1000\nlog_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\n")

    def command(self):
        return [MOSQUITTO, "-c", self.conf]

    def stop(self, sig=signal.SIGTERM):
        super().stop(sig)
        if "Error saving" in tail(self.log, 40):
            raise ChaosFailure(f"{self.name} could not save its persistence: {tail(self.log, 4)}")

    def url(self):
        return f"mqtt://127.0.0.1:{self.port}"

    def sink_toml(self, rig):
        """As the cloud broker of the `mqtt` sink."""
        return f'kind = "mqtt"\nurl = "{self.url()}"\ntopic_prefix = "cloud"\nversion = "5"\n'


class Tansu(Server):
    """tansu (Kafka API) with SQLite storage: it keeps topics and data across restarts."""

    def command(self):
        url = f"tcp://127.0.0.1:{self.port}"
        return [TANSU, "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "sqlite://tansu.db"]

    def cwd(self):
        return self.work  # tansu reads the sqlite:// path as relative

    def brokers(self):
        return f"127.0.0.1:{self.port}"

    def sink_toml(self, rig):
        toml = f'kind = "kafka"\nbrokers = "{self.brokers()}"\ntopic = "telemetry"\n'
        # tansu 0.6 panics ("more or less than one row", lite.rs:503) and
        # then stores nothing more when an idempotent producer bumps its
        # epoch, which librdkafka does after messages time out. So no
        # message may time out during an outage: the publish timeout
        # (librdkafka's message.timeout.ms) outlasts it. Without an outage
        # it is 60 s, not the default 5 s: a tansu that lags (one core at
        # ~60 us a record) would otherwise see every timed-out batch again.
        toml += f"publish_timeout_ms = {min(900_000, (rig.kafka_outage_secs + 60) * 1000)}\n"
        return toml

    def create_topic(self, topic):
        # One partition: tansu does its storage work on one task, and each
        # partition of a produce costs it a transaction of its own (a third
        # less CPU per record than with three partitions).
        out = subprocess.run([TANSU, "topic", "create", "--broker", f"tcp://127.0.0.1:{self.port}",
                              "--partitions", "1", topic], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise ChaosFailure(f"tansu topic create: {out.stderr.strip()}")
        self.index_headers()

    def index_headers(self):
        """tansu 0.6's SQLite schema has no index on the message headers, so a
        fetch scans every header ever stored: reading a topic back is
        quadratic (1,000 messages of a 49,000-message topic: 5 s; with the
        index: 49,000 in 3 s). Add the index (a far-side read speed-up only)."""
        try:
            db = sqlite3.connect(self.work / "tansu.db", timeout=30)
            db.execute("CREATE INDEX IF NOT EXISTS chaos_header_record ON header (topition, offset_id)")
            db.commit()
            db.close()
        except sqlite3.Error as e:
            log(f"warning: could not index tansu's headers ({e}): reading Kafka back will be slow")

    def keys(self, timeout):
        """Read back through the Kafka API; if tansu cannot serve the topic in
        time (tansu 0.6 fetched a 2M-record topic at under 1,000 records/s:
        36 minutes were not enough), read what it stored from its SQLite
        file instead, with tansu stopped (its storage is the far side's
        durable state: the same records, the same idempotency-key headers).
        A read-back given more than MAX_KAFKA_READ_S goes to the storage at
        once rather than wait for the timeout. A read through the Kafka API
        is compared with the storage read (tansu still running, read-only),
        so the quick scale checks the storage path that only large runs take."""
        if timeout > MAX_KAFKA_READ_S:
            log(f"reading tansu's storage (tansu.db): a Kafka read-back of this size "
                f"(timeout {timeout:.0f}s) would outlast tansu's fetch pace")
            return self.from_storage()
        try:
            keys = list(keys_from_command(
                [VENV_PY, "-c", KAFKA_READER, self.brokers(), "telemetry", timeout],
                "reading Kafka back", extract=str.strip))
        except ChaosFailure as e:
            log(f"warning: {str(e)[:200]}; reading tansu's storage (tansu.db) instead")
            return self.from_storage()
        stored = set(self.stored_keys())
        if stored != set(keys):
            raise ChaosFailure(f"tansu's storage and its Kafka API disagree: {len(stored - set(keys))} keys "
                               f"only in tansu.db, {len(set(keys) - stored)} only through Kafka "
                               "(has tansu's SQLite schema changed? see Tansu.stored_keys)")
        return keys

    def from_storage(self):
        """Stops tansu (if it runs) and reads the keys from its storage."""
        if self.proc is not None:
            self.stop()
        self.read_from_storage = True
        return self.stored_keys()

    def stored_keys(self):
        """The idempotency-key header of every record in tansu's SQLite storage."""
        db = sqlite3.connect(f"file:{self.work / 'tansu.db'}?mode=ro", uri=True, timeout=30)
        try:
            return [bytes(v).decode() if isinstance(v, (bytes, memoryview)) else str(v)
                    for (v,) in db.execute("SELECT v FROM header WHERE k = CAST('idempotency-key' AS BLOB)"
                                           " OR k = 'idempotency-key'")]
        finally:
            db.close()


class Moto(Server):
    """moto's S3 server. In memory: it is never killed (only frozen)."""

    can_kill = False

    def command(self):
        return [VENV_PY.parent / "moto_server", "-H", "127.0.0.1", "-p", self.port]

    def endpoint(self):
        return f"http://127.0.0.1:{self.port}"

    def create_bucket(self):
        # moto checks no signatures: a plain CreateBucket will do.
        req = urllib.request.Request(f"{self.endpoint()}/lake", method="PUT", data=b"")
        wait_for("moto to create the bucket", 30, lambda: http_ok(req))

    def sink_toml(self, rig):
        # Objects of up to 0.5 s of records, as an S3 lake would be set up
        # (an object per tiny batch would also make moto, the busiest far
        # side, the bottleneck of the machine and slow to read back).
        return (f'kind = "s3"\nurl = "s3://lake/edge"\nendpoint = "{self.endpoint()}"\n'
                f'access_key_id_file = "{rig.key_file}"\nsecret_access_key_file = "{rig.key_file}"\n'
                "batch_max_wait_ms = 500\n")

    def keys(self, timeout):
        return keys_from_command([VENV_PY, SUPPORT / "s3_dump.py", self.endpoint(), "lake"], "s3_dump.py")


class Analytics(Server):
    """tests/support/analytics_server.py: the HTTP sink's far side, an NDJSON file."""

    def __init__(self, work, name):
        super().__init__(work, name)
        self.out = self.work / "received.ndjson"

    def command(self):
        return [sys.executable, SUPPORT / "analytics_server.py", self.port, self.out]

    def sink_toml(self, rig):
        return f'kind = "http"\nurl = "http://127.0.0.1:{self.port}/ingest"\n'

    def keys(self, timeout):
        return keys_in_file(self.out)


class CloudSubscriber:
    """mosquitto_sub on the cloud broker's cloud/# at QoS 1 on a persistent
    session (it reconnects by itself across broker restarts); one record a line."""

    def __init__(self, work, broker):
        self.broker = broker
        self.out = Path(work) / "cloud-received.ndjson"
        self.err = Path(work) / "cloud-sub.log"
        self.proc = None

    def start(self):
        out = open(self.out, "ab")
        self.proc = subprocess.Popen(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(self.broker.port), "-q", "1",
             "-c", "-i", "chaos-sub", "-t", "cloud/#"],
            stdout=out, stderr=open(self.err, "ab"), stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_die_with_parent)
        out.close()
        CHILDREN.procs.append(self.proc)
        # Subscribed (the session exists) before any record is published: a
        # probe message (no idempotency key, so no record) comes through.

        def probe_seen():
            subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(self.broker.port), "-q", "1",
                            "-t", "cloud/_probe", "-m", "chaos-probe"], capture_output=True, timeout=10)
            time.sleep(0.2)
            return self.out.exists() and "chaos-probe" in self.out.read_text()
        wait_for("mosquitto_sub to subscribe", 20, probe_seen, 0.3)

    def keys(self):
        if self.proc.poll() is not None:
            log(f"mosquitto_sub exited ({self.proc.returncode}): restarting it on its session")
            self.start()
        return keys_in_file(self.out)


def http_ok(req, timeout=10):
    try:
        with urllib.request.urlopen(req, timeout=timeout):
            return True
    except (OSError, urllib.error.HTTPError):
        return False


def key_of(line):
    """The idempotency key of a line holding one record (JSON), or None."""
    m = KEY_RE.search(line)
    return m.group(1) if m else None


def keys_in_file(path):
    """Idempotency keys in a file of records, one record a line (streamed)."""
    if Path(path).exists():
        with open(path, errors="replace") as f:
            for line in f:
                key = key_of(line)
                if key:
                    yield key


def keys_from_command(cmd, what, extract=key_of):
    """Streams the stdout of a far-side reader (which has timeouts of its own), one key per line."""
    err = tempfile.TemporaryFile()
    with subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=err, text=True) as p:
        for line in p.stdout:
            key = extract(line)
            if key:
                yield key
    if p.returncode != 0:
        err.seek(0)
        raise ChaosFailure(f"{what} failed ({p.returncode}): {err.read().decode(errors='replace')[-400:]}")


# -------------------------------------------------------------------- gateway

def parse_metrics(text):
    """Prometheus text -> {(name, ((label, value), ...)): value}."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        pairs = tuple(sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels)))
        try:
            out[(name, pairs)] = float(value)
        except ValueError:
            pass
    return out


def metric_sum(metrics, name, **labels):
    want = set(labels.items())
    return sum(v for (n, pairs), v in metrics.items() if n == name and want <= set(pairs))


def histogram(metrics, name, **labels):
    """Cumulative buckets [(le, count)] of one histogram series."""
    want = set(labels.items())
    buckets = []
    for (n, pairs), v in metrics.items():
        if n == name + "_bucket" and want <= set(pairs):
            le = dict(pairs)["le"]
            buckets.append((float("inf") if le == "+Inf" else float(le), v))
    return sorted(buckets)


def quantile(q, before, after):
    """Quantile of the observations between two snapshots of one histogram
    (linear within a bucket, like PromQL's histogram_quantile); None if none."""
    prev = dict(before)
    delta = [(le, c - prev.get(le, 0)) for le, c in after]
    if not delta or delta[-1][1] <= 0:
        return None
    rank, lower, below = q * delta[-1][1], 0.0, 0.0
    for le, count in delta:
        if count >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * ((rank - below) / max(count - below, 1e-9))
        lower, below = le, count
    return lower


class Gateway:
    """The real `gateway` binary on a fixed data dir and HTTP port (a restart
    keeps both), with its config file, log, metrics and admin API."""

    def __init__(self, ctx, work, config, data_dir=None):
        self.ctx = ctx
        self.work = Path(work)
        self.port = free_port()
        self.data = Path(data_dir) if data_dir else self.work / "data"
        self.cfg = self.work / "gateway.toml"
        self.cfg.write_text(config)
        self.log = self.work / "gateway.log"
        self.proc = None

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self, timeout=120):
        """Starts it and waits for /readyz; the seconds that took."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env["MIMALLOC_ARENA_EAGER_COMMIT"] = "0"
        t0 = time.monotonic()
        self.proc = CHILDREN.spawn(
            [self.ctx.gateway_bin, "run", "--config", self.cfg, "--data-dir", self.data,
             "--http-addr", f"127.0.0.1:{self.port}", "--log-level", "warn"], self.log, env=env)
        wait_for("the gateway to be ready", timeout, self.ready, 0.05)
        return time.monotonic() - t0

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self):
        if not self.alive():
            rc = None if self.proc is None else self.proc.returncode
            raise ChaosFailure(f"the gateway exited unexpectedly (status {rc}): {tail(self.log, 5)}")

    def ready(self):
        self.check_alive()
        try:
            with urllib.request.urlopen(self.url("/readyz"), timeout=2) as r:
                return r.status == 200
        except (OSError, urllib.error.HTTPError):
            return False

    def kill9(self):
        CHILDREN.stop(self.proc, signal.SIGKILL)

    def stop(self, timeout=60):
        """SIGTERM; its exit status (None if it had to be killed)."""
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return None if p is None else p.returncode
        os.kill(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            CHILDREN.stop(p, signal.SIGKILL)
            return None
        CHILDREN.stop(p)
        return p.returncode

    def _get(self, path, token=False, timeout=10):
        headers = {"Authorization": f"Bearer {self.token()}"} if token else {}
        req = urllib.request.Request(self.url(path), headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read().decode()

    def token(self):
        return (self.data / "admin.token").read_text().strip()

    def metrics(self):
        return parse_metrics(self._get("/metrics"))

    def wal(self):
        """GET /admin/wal: per sink enqueued, inflight, dead, oldest_pending_age_s."""
        return json.loads(self._get("/admin/wal", token=True))

    def post(self, device, msg_id):
        """One record over HTTP: (status, Retry-After header, error code or None)."""
        body = json.dumps({"msg_id": msg_id, "ts": int(time.time() * 1000), "metrics": {"t": 1}})
        req = urllib.request.Request(self.url(f"/ingest/{device}"), data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.headers.get("Retry-After"), None
        except urllib.error.HTTPError as e:
            try:
                code = json.loads(e.read())["error"]["code"]
            except (ValueError, KeyError, TypeError):
                code = None
            return e.code, e.headers.get("Retry-After"), code

    def wal_check(self):
        """The offline `gateway wal check` (gateway stopped): (ok, output)."""
        out = subprocess.run([self.ctx.gateway_bin, "--config", self.cfg, "--data-dir", self.data,
                              "--json", "wal", "check"], capture_output=True, text=True, timeout=600)
        return out.returncode == 0, (out.stdout.strip() or out.stderr.strip())[-600:]

    def panics(self):
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text.count("panicked")

    def pid(self):
        return self.proc.pid


class BenchCtx:
    """What chaos.Gateway, chaos.Loadgen and chaos.check need, for a bench
    script: the binaries in BIN_DIR, a run tag and a scratch dir
    target/bench-NAME-{time}."""

    def __init__(self, bin_dir, name, tag):
        bin_dir = Path(bin_dir).resolve()
        self.gateway_bin = bin_dir / "gateway"
        self.loadgen_bin = bin_dir / "loadgen"
        self.scale = QUICK  # drain_timeout only
        self.run_tag = time.strftime(f"{tag}%H%M%S")
        self.run_dir = ROOT / "target" / f"bench-{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def gateway_config(mqtt, sinks, extra=""):
    return f'gateway_id = "chaos"\n{mqtt}{extra}{sinks}'


class Loadgen:
    """One `loadgen` run (http or mqtt) writing the acknowledged ids to its own file."""

    def __init__(self, ctx, work, kind, url, rate, secs, name, devices):
        self.name = name
        self.acked = Path(work) / f"acked-{name}.txt"
        self.stdout = Path(work) / f"loadgen-{name}.out"
        self.args = [ctx.loadgen_bin, kind, "--url", url, "--devices", devices,
                     "--device-prefix", name, "--rate", rate, "--duration", f"{secs}s",
                     "--acked", self.acked, "--run-id", f"{ctx.run_tag}{name}"]
        if kind == "http":
            self.args += ["--connections", 8]
        self.proc = None
        self.summary = None

    def start(self):
        self.proc = CHILDREN.spawn(self.args, self.stdout)
        return self

    def alive(self):
        return self.proc.poll() is None

    def finish(self, timeout):
        """Waits for the end of its --duration; its JSON summary."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"loadgen {self.name} did not end within {timeout:.0f}s: killing it")
        return self.stop()

    def stop(self):
        """Stops it (no signal handler: SIGKILL; what it acked so far is in its file)."""
        CHILDREN.stop(self.proc, signal.SIGKILL)
        for line in reversed(self.stdout.read_text(errors="replace").splitlines()):
            if line.startswith("{"):
                self.summary = json.loads(line)
                break
        else:  # killed: no summary line, but its list of acknowledged ids
            acked = len(self.acked.read_text().split()) if self.acked.exists() else 0
            self.summary = {"acked": acked, "stopped": True}
        return self.summary


# ------------------------------------------------------------------------ rig

class Rig:
    """The far sides of a scenario's sinks and its ingest broker: starts them,
    writes the gateway's [mqtt] and [sinks.*] config, reads what each sink got."""

    def __init__(self, work, sinks=ALL_SINKS, ingest="mosquitto", kafka_outage_secs=0):
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.sinks = list(sinks)
        self.kafka_outage_secs = kafka_outage_secs
        self.ingest_kind = ingest
        self.servers = {}
        if "lake" in sinks:
            self.servers["lake"] = Moto(self.work, "moto")
        if "api" in sinks:
            self.servers["api"] = Analytics(self.work, "analytics")
        if "cloud" in sinks:
            self.servers["cloud"] = Mosquitto(self.work, "cloud-mosquitto")
        if "events" in sinks:
            self.servers["events"] = Tansu(self.work, "tansu")
        self.ingest = Mosquitto(self.work, "ingest-mosquitto") if ingest == "mosquitto" else None
        self.embedded_port = free_port() if ingest == "embedded" else None
        self.archive = self.work / "archive"
        self.key_file = self.work / "s3-key"
        self.subscriber = None

    def start(self):
        log(f"starting the rig: {', '.join(self.sinks)}; ingest {self.ingest_kind}")
        everything = list(self.servers.values()) + ([self.ingest] if self.ingest else [])
        for s in everything:
            s.spawn()
        for s in everything:
            s.wait_ready()
        if "lake" in self.servers:
            self.servers["lake"].create_bucket()
            self.key_file.write_text("test")
        if "events" in self.servers:
            self.servers["events"].create_topic("telemetry")
        if "cloud" in self.servers:
            self.subscriber = CloudSubscriber(self.work, self.servers["cloud"])
            self.subscriber.start()
        return self

    def mqtt_toml(self):
        if self.ingest_kind == "mosquitto":
            return f'[mqtt]\nurl = "{self.ingest.url()}"\n'
        if self.ingest_kind == "embedded":
            return f'[mqtt]\nurl = "embedded"\nembedded_addr = "127.0.0.1:{self.embedded_port}"\n'
        return '[mqtt]\nurl = "off"\n'

    def mqtt_url(self):
        if self.ingest_kind == "mosquitto":
            return self.ingest.url()
        if self.ingest_kind == "embedded":
            return f"mqtt://127.0.0.1:{self.embedded_port}"
        return None

    def sinks_toml(self):
        parts = []
        for sink in self.sinks:
            if sink == "archive":
                body = f'kind = "s3"\nurl = "file://{self.archive}"\n'
            else:
                body = self.servers[sink].sink_toml(self)
            # TOML refuses a repeated key: the tuning adds what the sink does not set itself.
            tuning = "".join(line + "\n" for line in SINK_TUNING.splitlines()
                             if line.split(" =")[0] + " =" not in body)
            parts.append(f"[sinks.{sink}]\n{body}{tuning}")
        return "".join(parts)

    def config(self, wal=""):
        return gateway_config(self.mqtt_toml(), self.sinks_toml(), f"[wal]\n{wal}" if wal else "")

    def far_keys(self, sink, timeout):
        """Idempotency keys of every record at the sink's far side, repeats included (streamed)."""
        if sink == "archive":
            return self.archive_keys()
        if sink == "cloud":
            return self.subscriber.keys()
        return self.servers[sink].keys(timeout)

    def archive_keys(self):
        """The archive's keys, read while the gateway runs: its upkeep merges
        objects every minute, so a read that saw the object list change
        (an object gone, a merged one new) is thrown away and done again."""
        for _ in range(30):
            before = sorted(self.archive.rglob("*.ndjson.gz"))
            keys = []
            try:
                for f in before:
                    keys.extend(KEY_RE.findall(gzip.decompress(f.read_bytes()).decode()))
            except FileNotFoundError:
                time.sleep(1)
                continue
            except (OSError, EOFError, UnicodeDecodeError) as e:
                raise ChaosFailure(f"archive object {f} is unreadable: {e}")
            if sorted(self.archive.rglob("*.ndjson.gz")) == before:
                return keys
            time.sleep(1)
        raise ChaosFailure("the archive kept changing while it was read (30 tries)")


# -------------------------------------------------------------------- checker

@dataclass
class Result:
    scenario: str
    acked: int = 0
    delivered: dict = field(default_factory=dict)  # sink -> distinct records at the far side
    lost: dict = field(default_factory=dict)  # sink -> acknowledged ids missing there
    dups: dict = field(default_factory=dict)  # sink -> records - distinct records
    timings: dict = field(default_factory=dict)  # label -> text
    notes: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    details: list = field(default_factory=list)  # markdown lines for the results file
    skipped: bool = False

    @property
    def status(self):
        if self.skipped:
            return "SKIP"
        return "FAIL" if self.failures or any(self.lost.values()) else "PASS"

    def line(self):
        if self.skipped:
            return f"{self.scenario}: SKIP {'; '.join(self.notes)}"

        def per(d):
            return " ".join(f"{k}={v}" for k, v in d.items())
        text = (f"{self.scenario}: {self.status} acked={self.acked} delivered[{per(self.delivered)}] "
                f"lost[{per(self.lost)}] dups[{per(self.dups)}] timings[{per(self.timings)}]")
        if self.notes:
            text += " notes[" + "; ".join(self.notes) + "]"
        if self.failures:
            text += " FAILURES[" + "; ".join(self.failures) + "]"
        return text


def read_acked(files):
    acked = set()
    for f in files:
        if Path(f).exists():
            acked.update(Path(f).read_text().split())
    return acked


def wait_drained(gw, timeout, settle=2.0):
    """Until every sink's enqueued + inflight is 0 and ingest has not moved for
    `settle` s (an ingest broker may still hold messages for the gateway).
    Returns the seconds waited."""
    t0 = time.monotonic()
    state = {"ingested": None, "since": None}

    def drained():
        gw.check_alive()
        try:
            sinks = gw.wal()["sinks"]
            ingested = metric_sum(gw.metrics(), "gateway_ingest_records_total")
        except (OSError, urllib.error.HTTPError):
            return False
        pending = sum(s["enqueued"] + s["inflight"] for s in sinks.values())
        now = time.monotonic()
        if pending or ingested != state["ingested"]:
            state.update(ingested=ingested, since=now)
            return False
        return now - state["since"] >= settle

    wait_for("the gateway to drain (every sink's enqueued + inflight = 0)", timeout, drained, 0.5)
    return time.monotonic() - t0


def check(ctx, res, gw, rig, acked_files, stop_gateway=True):
    """The check every scenario ends with: drain, read every far side, count
    lost and duplicate records per sink; then stop the gateway (SIGTERM) and
    run the offline WAL check. Fills `res`."""
    acked = read_acked(acked_files)
    res.acked = len(acked)
    log(f"{res.scenario}: {len(acked)} acknowledged; waiting for the gateway to drain")
    res.timings["drain"] = fmt_s(wait_drained(gw, ctx.scale.drain_timeout))
    dead = {s: v["dead"] for s, v in gw.wal()["sinks"].items() if v["dead"]}
    if dead:
        res.failures.append(f"dead letters {dead}")
    t0 = time.monotonic()
    read_timeout = 120 + len(acked) / READ_PACE
    todo, missing = list(rig.sinks), {}
    deadline = time.monotonic() + 30  # a subscriber may lag a little behind the broker's ack
    while True:
        for sink in todo:
            t1 = time.monotonic()
            total, distinct = 0, set()
            for key in rig.far_keys(sink, read_timeout):
                total += 1
                distinct.add(key)
            missing[sink] = acked - distinct
            res.delivered[sink], res.dups[sink] = len(distinct), total - len(distinct)
            log(f"{res.scenario}: read {total} records at {sink} in {time.monotonic() - t1:.1f}s")
        todo = [s for s in todo if missing[s]]
        if not todo or time.monotonic() > deadline:
            break
        log(f"{res.scenario}: still missing records at {', '.join(todo)}: reading again")
        time.sleep(3)
    for sink, server in rig.servers.items():
        if server.read_from_storage:
            res.notes.append(f"{sink} read back from tansu's SQLite storage (too many records for its Kafka fetch, or the fetch timed out)")
    for sink in rig.sinks:
        res.lost[sink] = len(missing[sink])
        if missing[sink]:
            res.notes.append(f"{sink} is missing e.g. {', '.join(sorted(missing[sink])[:5])}")
    res.delivered = {s: res.delivered[s] for s in rig.sinks}
    res.dups = {s: res.dups[s] for s in rig.sinks}
    res.timings["read"] = fmt_s(time.monotonic() - t0)
    if gw.panics():
        res.failures.append(f"{gw.panics()} panics in the gateway log")
    for server in rig.servers.values():
        if "panicked" in (server.log.read_text(errors="replace") if server.log.exists() else ""):
            res.failures.append(f"the far side {server.name} panicked (a test-server bug; see {server.log})")
    if stop_gateway:
        finish_gateway(res, gw)


# The gateway's wal.ack_flush (its default): sink acknowledgements wait in
# memory at most this long, so a crash may deliver this long of records
# again; IN_FLIGHT_SECS allows for the batches a sink had sent but not had
# acknowledged when the process died.
ACK_FLUSH_SECS = 1.0
IN_FLIGHT_SECS = 1.0


def bound_duplicates(ctx, res, crashes, what):
    """Fails `res` if a sink got more duplicates than `crashes` crashes may
    cause: per crash, (ACK_FLUSH_SECS + IN_FLIGHT_SECS) of the whole load."""
    rate = ctx.scale.http_rate + ctx.scale.mqtt_rate
    per_crash = rate * (ACK_FLUSH_SECS + IN_FLIGHT_SECS)
    worst = max(res.dups.values(), default=0)
    for sink, n in sorted(res.dups.items()):
        if n > crashes * per_crash:
            res.failures.append(f"{sink}: {n} duplicates over {crashes} crashes, more than "
                                f"{per_crash:.0f} a {what} ({rate}/s x ({ACK_FLUSH_SECS} s ack_flush + "
                                f"{IN_FLIGHT_SECS} s in flight))")
    res.notes.append(f"duplicates per {what} at most {worst / max(crashes, 1):.0f} at one sink "
                     f"(bound {per_crash:.0f}: {ACK_FLUSH_SECS} s of held acks + {IN_FLIGHT_SECS} s in flight at {rate}/s)")


def finish_gateway(res, gw):
    """SIGTERM the gateway (it must exit, status 0) and run the offline WAL check."""
    rc = gw.stop()
    if rc != 0:
        res.failures.append(f"gateway exit status after SIGTERM: {rc}")
    ok, out = gw.wal_check()
    if not ok:
        res.failures.append(f"wal check: {out}")
    res.notes.append("wal check clean" if ok else "wal check FAILED")


def mixed_load(ctx, work, gw, rig, secs, http_rate=None, mqtt_rate=None):
    """HTTP (20 devices, 8 connections) and MQTT (10 devices) load at fixed rates."""
    loads = [Loadgen(ctx, work, "http", gw.url(""), http_rate or ctx.scale.http_rate, secs, "http", 20).start()]
    if rig.mqtt_url():
        loads.append(Loadgen(ctx, work, "mqtt", rig.mqtt_url(), mqtt_rate or ctx.scale.mqtt_rate,
                             secs, "mqtt", 10).start())
    return loads


def load_notes(res, loads):
    for lg in loads:
        s = lg.summary or {}
        if s.get("stopped"):
            res.notes.append(f"loadgen {lg.name}: acked {s['acked']} (stopped at the end)")
        else:
            res.notes.append(f"loadgen {lg.name}: sent {s.get('sent', '?')} acked {s.get('acked', '?')} "
                             f"refused {s.get('refused', '?')} errors {s.get('errors', '?')}")


def check_loads_alive(loads):
    for lg in loads:
        if not lg.alive() and lg.proc.returncode not in (0, None):
            raise ChaosFailure(f"loadgen {lg.name} exited with {lg.proc.returncode}: {tail(lg.stdout)}")


# ------------------------------------------------------------------ scenarios

def crash_loop(ctx):
    """Mixed load, all sinks; N times: wait 1-4 s, kill -9, restart."""
    res = Result("crash_loop")
    work = ctx.workdir("crash_loop")
    rig = Rig(work).start()
    gw = Gateway(ctx, work, rig.config())
    gw.start()
    cycles = ctx.scale.crash_cycles
    waits = [ctx.rng.uniform(1, 4) for _ in range(cycles)]
    # The load lasts the cycles plus 1 s a restart (more than a restart takes)
    # and a few seconds after the last one.
    secs = round(sum(waits) + cycles * 1.0 + 3)
    loads = mixed_load(ctx, work, gw, rig, secs=secs)
    ready = []
    for i, wait in enumerate(waits):
        time.sleep(wait)
        gw.check_alive()
        check_loads_alive(loads)
        if not all(lg.alive() for lg in loads):
            res.notes.append(f"the load ended before kill #{i + 1}: restarts were slower than 1 s")
        gw.kill9()
        ready.append(gw.start())
        log(f"crash_loop: kill -9 #{i + 1}/{cycles}, ready again in {ready[-1]:.2f}s")
    for lg in loads:
        lg.finish(secs + 120)
    load_notes(res, loads)
    res.timings.update(cycles=str(cycles), ready_avg=fmt_s(sum(ready) / len(ready)), ready_max=fmt_s(max(ready)))
    check(ctx, res, gw, rig, [lg.acked for lg in loads])
    bound_duplicates(ctx, res, cycles, "kill -9")
    return res


def sink_outages(ctx):
    """Baseline, then killed / frozen sinks while the load runs; p99 of the others, drain times."""
    res = Result("sink_outages")
    work = ctx.workdir("sink_outages")
    secs = ctx.outage_secs
    rig = Rig(work, sinks=[s for s in ALL_SINKS if s not in ctx.skip_sinks], kafka_outage_secs=secs).start()
    gw = Gateway(ctx, work, rig.config())
    gw.start()
    plan = [(kind, [s for s in targets if s in rig.sinks and (kind == "frozen" or rig.servers[s].can_kill)])
            for kind, targets in ctx.scale.outage_plan]
    plan = [(kind, targets) for kind, targets in plan if targets]
    if ctx.skip_sinks:
        res.notes.append(f"without {', '.join(sorted(ctx.skip_sinks))} (--skip-sinks)")
    loads = mixed_load(ctx, work, gw, rig, secs=secs * (len(plan) + 1) * 4 + 300)  # stopped below
    time.sleep(3)  # warm-up
    log(f"sink_outages: baseline phase of {secs}s")
    base = e2e_p99(gw, rig.sinks, secs)
    res.details += [f"Baseline ({secs} s): receive -> ack p99 "
                    + ", ".join(f"{s} {ms(v)}" for s, v in base.items()),
                    "",
                    "| phase | sinks out | p99 of the other sinks (x baseline) | worst ratio | drain after recovery |",
                    "|---|---|---|---|---|"]
    worst_all, phases = 0.0, []
    for kind, targets in plan:
        worst, drains, row = outage_phase(ctx, gw, rig, kind, targets, base, secs)
        worst_all = max(worst_all, worst)
        phases.append(f"{kind} {'+'.join(targets)}: drain " + "/".join(fmt_s(d) for d in drains.values())
                      + f", others' p99 x{worst:.2f}")
        res.details.append(row)
    for lg in loads:
        lg.stop()
    load_notes(res, loads)
    res.timings["phases"] = "{" + "; ".join(phases) + "}"
    res.timings["worst_p99_ratio"] = f"{worst_all:.2f}"
    if worst_all > 2:
        res.notes.append(f"p99 of the sinks not in outage went to {worst_all:.2f}x the baseline (target 2x)")
    if "lake" in rig.sinks:
        res.notes.append("lake (moto) frozen only: killing moto would lose its in-memory objects")
    check(ctx, res, gw, rig, [lg.acked for lg in loads])
    return res


def e2e_p99(gw, sinks, secs):
    """Receive -> sink ack p99 per sink over the next `secs` s (gateway_e2e_latency_seconds deltas)."""
    before = gw.metrics()
    time.sleep(secs)
    gw.check_alive()
    after = gw.metrics()
    name = "gateway_e2e_latency_seconds"
    return {s: quantile(0.99, histogram(before, name, sink=s), histogram(after, name, sink=s)) for s in sinks}


def outage_phase(ctx, gw, rig, kind, targets, base, secs):
    """`targets` killed or frozen for `secs` s, then back; waits until each has drained.
    Returns (worst p99 ratio of the other sinks, drain seconds per target, markdown row)."""
    log(f"sink_outages: {kind}: {', '.join(targets)} for {secs}s")
    for s in targets:
        rig.servers[s].outage(kind)
    others = [s for s in rig.sinks if s not in targets]
    p99 = e2e_p99(gw, others, secs)
    ratios = {s: p99[s] / base[s] for s in others if p99[s] and base[s]}
    worst = max(ratios.values(), default=0.0)
    t0 = time.monotonic()
    for s in targets:
        rig.servers[s].recover(kind)
    drains = {}

    def all_drained():
        for s in targets:
            if s not in drains and backlog_gone(gw, s):
                drains[s] = time.monotonic() - t0
        return len(drains) == len(targets)
    try:
        wait_for("the backlog to drain", ctx.scale.drain_timeout, all_drained, 0.25)
    except ChaosFailure:
        stuck = ", ".join(s for s in targets if s not in drains)
        raise ChaosFailure(f"{stuck} did not drain within {ctx.scale.drain_timeout}s after the {kind} outage")
    drains = {s: drains[s] for s in targets}
    # The last backlog records acked are up to ~1 s old: let them out of the
    # next phase's latency window.
    time.sleep(min(10, secs / 3))
    log(f"sink_outages: {kind} {'+'.join(targets)} recovered; drained in "
        + ", ".join(f"{s} {fmt_s(d)}" for s, d in drains.items()) + f"; worst p99 ratio of the others {worst:.2f}")
    row = (f"| {kind} | {', '.join(targets)} | "
           + ", ".join(f"{s} {ms(p99[s])}" + (f" (x{ratios[s]:.2f})" if s in ratios else "") for s in others)
           + f" | {worst:.2f} {'(target <= 2)' if worst <= 2 else '(ABOVE the 2x target)'} | "
           + ", ".join(f"{s} {fmt_s(d)}" for s, d in drains.items()) + " |")
    return worst, drains, row


def backlog_gone(gw, sink):
    """The sink holds no record 1 s old or older (the live load keeps a few in flight)."""
    gw.check_alive()
    try:
        s = gw.wal()["sinks"][sink]
    except (OSError, urllib.error.HTTPError):
        return False
    age = s.get("oldest_pending_age_s")  # whole seconds
    return (s["enqueued"] + s["inflight"]) == 0 or (age is not None and age < 1)


def ms(seconds):
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def broker_restart(ctx):
    """SIGTERM + restart of the ingest Mosquitto in the middle of the load."""
    res = Result("broker_restart")
    work = ctx.workdir("broker_restart")
    rig = Rig(work).start()
    gw = Gateway(ctx, work, rig.config())
    gw.start()
    restarts, gap = ctx.scale.broker_restarts, 6
    secs = restarts * (gap + 4) + gap
    loads = mixed_load(ctx, work, gw, rig, secs=secs)
    reconnect = []
    for i in range(restarts):
        time.sleep(gap)
        before = metric_sum(gw.metrics(), "gateway_mqtt_reconnects_total")
        rig.ingest.stop(signal.SIGTERM)
        time.sleep(1)
        t0 = time.monotonic()
        rig.ingest.start()

        def reconnected():
            gw.check_alive()
            m = gw.metrics()
            return (metric_sum(m, "gateway_mqtt_reconnects_total") > before
                    and metric_sum(m, "gateway_mqtt_connected") == 1)
        wait_for("the gateway to reconnect to the ingest broker", 120, reconnected)
        reconnect.append(time.monotonic() - t0)
        log(f"broker_restart: restart #{i + 1}/{restarts}: the gateway reconnected in {reconnect[-1]:.2f}s")
    for lg in loads:
        lg.finish(secs + 120)
    load_notes(res, loads)
    res.timings.update(restarts=str(restarts), reconnect_max=fmt_s(max(reconnect)),
                       reconnect_avg=fmt_s(sum(reconnect) / len(reconnect)))
    check(ctx, res, gw, rig, [lg.acked for lg in loads])
    return res


def disk_full(ctx):
    """WAL on a small tmpfs filled up to ~4 MiB free, then freed."""
    res = Result("disk_full")
    if os.geteuid() != 0:
        res.failures.append("needs root (mount -t tmpfs)")
        return res
    work = ctx.workdir("disk_full")
    disk = work / "tmpfs"
    mount_tmpfs(disk, "96m")
    try:
        return _disk_full(ctx, res, work, disk)
    finally:
        CHILDREN.stop_all()
        unmount(disk)


def _disk_full(ctx, res, work, disk):
    rig = Rig(work, sinks=("archive", "api")).start()
    gw = Gateway(ctx, work, rig.config(wal="min_free_disk_bytes = 8388608\n"), data_dir=disk / "data")
    gw.start()
    hold = ctx.scale.disk_full_secs
    secs = 5 + hold + 15
    loads = mixed_load(ctx, work, gw, rig, secs=secs)
    probe_acked, n = work / "acked-probe.txt", [0]

    def probe():
        n[0] += 1
        status, retry_after, code = gw.post("probe", f"p{n[0]}")
        if status in (200, 202):
            with open(probe_acked, "a") as f:
                f.write(f"probe:p{n[0]}\n")
        return status, retry_after, code

    time.sleep(5)
    st = os.statvfs(disk)
    filler_size = st.f_bavail * st.f_frsize - 4 * MIB
    filler = disk / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, filler_size)
    t_full = time.monotonic()
    log(f"disk_full: filler of {filler_size / MIB:.0f} MiB written; waiting for 503")

    def refused_with_retry_after():
        answer = probe()
        return answer if answer[0] == 503 and answer[1] else None

    refused = wait_for("HTTP 503 with Retry-After", 60, refused_with_retry_after, 0.2)
    res.timings["full_to_503"] = fmt_s(time.monotonic() - t_full)
    res.notes.append(f"probe got {refused[0]} {refused[2]} with Retry-After: {refused[1]}")
    wait_for("gateway_backpressure_active = 1", 30,
             lambda: metric_sum(gw.metrics(), "gateway_backpressure_active") == 1)

    def mqtt_in():
        return metric_sum(gw.metrics(), "gateway_ingest_records_total", source="mqtt", outcome="accepted")

    m1, t1 = mqtt_in(), time.monotonic()
    time.sleep(hold)
    gw.check_alive()
    m2 = mqtt_in()
    published = ctx.scale.mqtt_rate * (time.monotonic() - t1)
    res.notes.append(f"MQTT records accepted while full: {m2 - m1:.0f} (devices published ~{published:.0f})")
    if m2 - m1 > 0.1 * published:
        res.failures.append(f"MQTT ingest did not pause while the disk was full ({m2 - m1:.0f} accepted)")
    status = probe()[0]
    if status != 503:  # near the guard, ingest may flap: worth a note, not a failure
        res.notes.append(f"a second probe, {hold}s into the full disk, got {status}")
    filler.unlink()
    t_free = time.monotonic()
    log("disk_full: filler deleted; waiting for ingest to resume")
    wait_for("HTTP ingest to resume (202)", 120, lambda: probe()[0] in (200, 202), 0.5)
    res.timings["resume_http"] = fmt_s(time.monotonic() - t_free)
    wait_for("MQTT ingest to resume", 120, lambda: mqtt_in() > m2, 0.5)
    res.timings["resume_mqtt"] = fmt_s(time.monotonic() - t_free)
    wait_for("backpressure to clear", 120,
             lambda: metric_sum(gw.metrics(), "gateway_backpressure_active") == 0, 0.5)
    res.timings["resume_backpressure_off"] = fmt_s(time.monotonic() - t_free)
    for lg in loads:
        lg.finish(secs + 120)
    load_notes(res, loads)
    check(ctx, res, gw, rig, [lg.acked for lg in loads] + [probe_acked])
    return res


# ------------------------------------------------------------------ power cut

POWERCUT_SOURCE = "powercut"  # powercut-fs's mount source in /proc/self/mounts


def powercut_mounts(under):
    """powercut-fs mount points at or below `under`, stale ones included (a
    dead FUSE server leaves a mount that answers ENOTCONN, which
    os.path.ismount does not see)."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return []
    base, found = str(under).rstrip("/"), []
    for line in lines:
        fields = line.split()
        if len(fields) >= 3 and fields[0] == POWERCUT_SOURCE and fields[2].startswith("fuse"):
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
            if point == base or point.startswith(base + "/"):
                found.append(Path(point))
    return found


def force_unmount(path):
    """umount, else a lazy detach (a busy or stale mount)."""
    for args in (["umount", str(path)], ["umount", "-l", str(path)]):
        if subprocess.run(args, capture_output=True).returncode == 0:
            return True
    return False


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path, data, fsync):
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


class PowercutFs:
    """tools/powercut-fs mounted at WORK/mnt, served by its own process: every
    write stays in memory until fsync; a cut (SIGUSR1) forgets what was not
    synced. Its status file, outside the mount, counts the cuts done."""

    def __init__(self, ctx, work):
        self.bin = ctx.powercut_bin
        self.mnt = Path(work) / "mnt"
        self.status_file = Path(work) / "powercut-status.json"
        self.log = Path(work) / "powercut-fs.log"
        self.proc = None

    def start(self):
        # A mount left by an aborted run (the harness SIGKILLed: its children
        # die with it, their mounts stay) must not get in the way.
        for stale in powercut_mounts(TMP_BASE):
            log(f"powercut: unmounting a stale powercut-fs mount {stale}")
            force_unmount(stale)
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.proc = CHILDREN.spawn([self.bin, self.mnt, "--status", self.status_file], self.log)
        wait_for("powercut-fs to mount", 30,
                 lambda: self.check_alive() and self.status().get("mounted") and powercut_mounts(self.mnt))
        return self

    def check_alive(self):
        if self.proc is None or self.proc.poll() is not None:
            rc = None if self.proc is None else self.proc.returncode
            raise ChaosFailure(f"powercut-fs exited ({rc}): {tail(self.log, 4)}")
        return True

    def status(self):
        try:
            return json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return {}

    def cut(self):
        """A power cut; returns powercut-fs's report of it once it is complete."""
        before = self.status().get("cuts", 0)
        os.kill(self.proc.pid, signal.SIGUSR1)

        def done():
            self.check_alive()
            st = self.status()
            return st if st.get("cuts", 0) > before else None
        return wait_for("the power cut to complete", 30, done, 0.02)["last_cut"]

    def stop(self):
        """Unmounts (SIGTERM: powercut-fs unmounts, lazily if busy); its last status."""
        if self.proc is not None:
            CHILDREN.stop(self.proc, signal.SIGTERM)
            self.proc = None
        for m in powercut_mounts(self.mnt):
            force_unmount(m)
        return self.status()


def strictness_probe(fs):
    """True if the mount forgets what it must (an unsynced write, a file whose
    directory was not synced) and keeps what was synced: else the scenario
    would prove nothing."""
    synced, unsynced, late = (fs.mnt / n for n in ("probe-synced", "probe-unsynced", "probe-late"))
    write_file(synced, b"synced", fsync=True)
    write_file(unsynced, b"acknowledged before fsync", fsync=False)
    fsync_dir(fs.mnt)  # both names durable; only synced's data
    write_file(late, b"fsynced, its directory not", fsync=True)
    fs.cut()
    ok = synced.read_bytes() == b"synced" and unsynced.read_bytes() == b"" and not late.exists()
    for p in (synced, unsynced, late):
        p.unlink(missing_ok=True)
    fsync_dir(fs.mnt)
    return ok


def admin_post(gw, path, body):
    req = urllib.request.Request(gw.url(path), data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {gw.token()}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        raise ChaosFailure(f"POST {path} {body}: {e.code} {e.read()[:300]!r}")


RUNTIME_KEY = ("api", "retry_max_ms")  # a runtime setting harmless to change under load


def runtime_problem(data, expected):
    """What is wrong with runtime.json after a cut (None if nothing): it must
    be valid JSON holding the last setting config.set acknowledged."""
    path = data / "runtime.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return "runtime.json is gone"
    except (OSError, ValueError) as e:
        return f"runtime.json is not valid JSON ({e})"
    sink, key = RUNTIME_KEY
    got = doc.get("sinks", {}).get(sink, {}).get(key) if isinstance(doc, dict) else None
    if got != expected:
        return f"runtime.json holds sinks.{sink}.{key} = {got}, config.set had acknowledged {expected}"
    return None


def archive_problems(root, verified, durable_before):
    """Checks the archive sink's objects after a cut: each new one must be a
    valid gzip of NDJSON records; none that survived an earlier cut may be
    gone (an object is published with fsync of the file and its directory
    before the sink acknowledges it), unless the archive's upkeep merged it:
    then each of its records is in an object that is there now. `verified`
    maps each checked object to its records' keys. Returns (problems, the
    objects now, staging files left over)."""
    now = set(root.rglob("*.ndjson.gz")) if root.exists() else set()
    problems = []
    for p in sorted(now - set(verified)):
        try:
            lines = gzip.decompress(p.read_bytes()).decode().splitlines()
            keys = frozenset(json.loads(line)["idempotency_key"] for line in lines)
            if not lines:
                raise ValueError("an object without records")
        except (OSError, EOFError, UnicodeDecodeError, ValueError, KeyError) as e:
            problems.append(f"archive object {p.relative_to(root)} is unreadable: {e}")
            continue
        verified[p] = keys
    gone = sorted(durable_before - now)
    if gone:
        held = set().union(*(verified[p] for p in now if p in verified))
        for p in gone:
            missing = verified.get(p, frozenset()) - held
            if p not in verified or missing:
                problems.append(f"archive object {p.relative_to(root)} survived an earlier cut and is gone"
                                f" ({len(missing)} of its records are in no object now)")
            verified.pop(p, None)
    staging = sum(1 for p in root.rglob("*#*")) if root.exists() else 0
    return problems[:5], now, staging


def wal_check_copy(ctx, gw, dest):
    """The offline `gateway wal check` on a copy of what the cut left (the WAL
    as the next start finds it; checking in place would recover it first)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in ("wal.db", "wal.db-wal", "runtime.json"):
        if (gw.data / name).exists():
            shutil.copyfile(gw.data / name, dest / name)
    out = subprocess.run([ctx.gateway_bin, "--config", gw.cfg, "--data-dir", dest, "--json", "wal", "check"],
                         capture_output=True, text=True, timeout=600)
    return out.returncode == 0, (out.stdout.strip() or out.stderr.strip())[-400:]


def powercut(ctx):
    """Data dir and archive on powercut-fs; N times: config.set, wait 1-4 s, kill -9, cut, check, restart."""
    res = Result("powercut")
    if os.geteuid() != 0 or not Path("/dev/fuse").exists():
        res.failures.append("needs root and /dev/fuse (a FUSE mount)")
        return res
    if not ctx.powercut_bin.exists():
        res.failures.append(f"no powercut-fs binary at {ctx.powercut_bin} (cargo build -p powercut-fs)")
        return res
    work = ctx.workdir("powercut")
    fs = PowercutFs(ctx, work)
    held = {}
    try:
        fs.start()
        return _powercut(ctx, res, work, fs, held)
    finally:
        if "gw" in held:  # a failure mid-way: the gateway goes before its filesystem
            CHILDREN.stop(held["gw"].proc, signal.SIGKILL)
        CHILDREN.stop_all()
        last = fs.stop()
        if last:
            res.notes.append(f"powercut-fs: {last.get('fsyncs')} file fsyncs, "
                             f"{last.get('fsyncdirs')} directory fsyncs in all")


def _powercut(ctx, res, work, fs, held):
    if not strictness_probe(fs):
        res.failures.append("powercut-fs kept an unsynced write or an unsynced file across a cut: not strict")
        return res
    res.notes.append("probe: a write acknowledged before fsync and a file whose directory was not "
                     "fsynced were lost at a cut, the synced file kept")
    # The gateway creates the data dir and the archive (its objects are on
    # the mount too): that those directories survive a cut is under test
    # as well.
    data = fs.mnt / "data"
    rig = Rig(work)
    rig.archive = fs.mnt / "archive"
    rig.start()
    gw = held["gw"] = Gateway(ctx, work, rig.config(), data_dir=data)
    gw.start()
    cycles = ctx.scale.powercut_cycles
    waits = [ctx.rng.uniform(1, 4) for _ in range(cycles)]
    # The load lasts the waits plus 2.5 s a cycle (config.set, kill, cut,
    # checks and restart took ~1.2 s on debug binaries) and a few seconds after.
    secs = round(sum(waits) + cycles * 2.5 + 3)
    loads = mixed_load(ctx, work, gw, rig, secs=secs)
    ready, cut_secs, check_secs = [], [], []
    verified, durable_objects, tokens = {}, set(), {gw.token()}
    dropped = reverted = stale = staging_max = 0
    lost_paths = {}  # what the cuts threw away, by path (archive objects lumped together)
    for i, wait in enumerate(waits):
        expected = 1900 + i  # <= 2000: the api sink keeps retrying fast
        sink, key = RUNTIME_KEY
        admin_post(gw, "/admin/config", {"key": f"sinks.{sink}.{key}", "value": expected})
        time.sleep(wait)
        gw.check_alive()
        check_loads_alive(loads)
        if not all(lg.alive() for lg in loads):
            res.notes.append(f"the load ended before cut #{i + 1}: cycles were slower than planned")
        gw.kill9()
        t0 = time.monotonic()
        report = fs.cut()
        cut_secs.append(time.monotonic() - t0)
        dropped += report["dropped"]
        reverted += report["reverted"]
        stale += report["stale_handles"]
        for p in report.get("dropped_paths", []) + report.get("reverted_paths", []):
            p = "archive/*" if p.startswith("archive/") else p
            lost_paths[p] = lost_paths.get(p, 0) + 1
        t0 = time.monotonic()
        problem = runtime_problem(data, expected)
        if problem:
            res.failures.append(f"cut #{i + 1}: {problem}")
        problems, durable_objects, staging = archive_problems(rig.archive, verified, durable_objects)
        staging_max = max(staging_max, staging)
        res.failures += [f"cut #{i + 1}: {p}" for p in problems]
        ok, out = wal_check_copy(ctx, gw, work / "wal-copy")
        if not ok:
            res.failures.append(f"cut #{i + 1}: wal check of what the cut left: {out}")
        check_secs.append(time.monotonic() - t0)
        ready.append(gw.start())
        tokens.add(gw.token())
        log(f"powercut: cut #{i + 1}/{cycles}: dropped {report['dropped']} "
            f"{report.get('dropped_paths', [])}, reverted {report['reverted']} "
            f"{report.get('reverted_paths', [])}; {len(durable_objects)} archive objects; "
            f"ready again in {ready[-1]:.2f}s")
    for lg in loads:
        lg.finish(secs + 120)
    load_notes(res, loads)
    res.timings.update(cuts=str(cycles), wait_avg=fmt_s(sum(waits) / cycles),
                       cut_avg=f"{1000 * sum(cut_secs) / cycles:.0f}ms",
                       checks_avg=fmt_s(sum(check_secs) / cycles),
                       ready_avg=fmt_s(sum(ready) / cycles), ready_max=fmt_s(max(ready)))
    res.notes.append(f"over {cycles} cuts powercut-fs dropped {dropped} unsynced files/dirs, reverted "
                     f"{reverted} files to their synced contents and staled {stale} open handles; "
                     "unsynced state thrown away (cuts): "
                     + ", ".join(f"{p} x{n}" for p, n in sorted(lost_paths.items(), key=lambda x: -x[1])[:8]))
    if not res.failures:
        res.notes.append("every cut left a valid runtime.json holding the last acknowledged config.set, "
                         "readable archive objects (none that had survived a cut gone) and a WAL "
                         "whose `wal check` was clean")
    if staging_max:
        res.notes.append(f"up to {staging_max} staging files (*#N) of interrupted archive uploads left over")
    if len(tokens) > 1:
        res.notes.append(f"admin.token was regenerated {len(tokens) - 1} times: a cut lost it "
                         "(created with fsync of the file, not of its directory)")
    check(ctx, res, gw, rig, [lg.acked for lg in loads])
    bound_duplicates(ctx, res, cycles, "cut")
    problem = runtime_problem(data, 1900 + cycles - 1)
    if problem:
        res.failures.append(f"after the run: {problem}")
    problems, _, _ = archive_problems(rig.archive, verified, durable_objects)
    res.failures += [f"after the run: {p}" for p in problems]
    res.details += [f"Power cuts: {cycles} x (config.set, {fmt_s(min(waits))}-{fmt_s(max(waits))} of "
                    "mixed load, kill -9, cut, checks, restart); data dir and archive on powercut-fs "
                    f"({ctx.powercut_bin}).", ""]
    return res


def soak(ctx):
    """1 h at 2k msg/s, one sink frozen 10 min in the middle; embedded broker, then Mosquitto."""
    res = Result("soak")
    for ingest in ctx.soak_modes:
        _soak_run(ctx, res, ingest)
        CHILDREN.stop_all()
    return res


def _soak_run(ctx, res, ingest):
    sc = ctx.scale
    secs, frozen_sink = ctx.soak_secs, ctx.soak_frozen
    outage = min(sc.soak_outage_secs, secs // 3)
    work = ctx.workdir(f"soak-{ingest}")
    # The far sides keep every record (about 200 bytes a record and sink, as
    # JSON lines or gzip objects) and the WAL holds 10 minutes: at 2k records/s
    # with 4 sinks an hour wrote 5.5 GB. Refuse to start rather than fill the
    # disk midway (three runs once died of ENOSPC on a shared disk).
    need = sc.soak_rate * secs * 250 * len(ctx.soak_sinks) + 2 * 1024**3
    free = shutil.disk_usage(work).free
    if free < need:
        raise ChaosFailure(f"soak[{ingest}] needs about {need / 1024**3:.1f} GiB free in {work} "
                           f"for its far sides and WAL, {free / 1024**3:.1f} GiB are")
    # "http": no MQTT ingest at all (mqtt.url = "off"), the whole rate over HTTP.
    rig = Rig(work, sinks=ctx.soak_sinks, ingest="off" if ingest == "http" else ingest).start()
    # A short retention and dedup window (delivered records are kept for the
    # longer of the two), so that the WAL can reach a steady size within the hour.
    gw = Gateway(ctx, work, rig.config(wal='retention = "10m"\ndedup_window = "10m"\n'))
    gw.start()
    http_rate = sc.soak_rate if ingest == "http" else sc.soak_rate // 2
    loads = mixed_load(ctx, work, gw, rig, secs=secs, http_rate=http_rate, mqtt_rate=sc.soak_rate // 2)
    t0 = time.monotonic()
    freeze_at, thaw_at = (secs - outage) / 2, (secs + outage) / 2
    samples, frozen, thawed_at, drained, before_outage = [], False, None, None, None
    csv = work / "samples.csv"
    csv.write_text("t_s,rss_bytes,fds,threads,wal_file_bytes,wal_bytes_gauge,backlog\n")
    tick = 0
    while any(lg.alive() for lg in loads):  # a tick a second, a sample every 10 s
        now = time.monotonic() - t0
        if not frozen and now >= freeze_at:
            rig.servers[frozen_sink].freeze()
            frozen, before_outage = True, (samples[-1] if samples else None)
            log(f"soak[{ingest}]: {frozen_sink} frozen for {outage}s")
        if frozen and thawed_at is None and now >= thaw_at:
            rig.servers[frozen_sink].thaw()
            thawed_at = time.monotonic()
            log(f"soak[{ingest}]: {frozen_sink} thawed")
        if thawed_at and drained is None and backlog_gone(gw, frozen_sink):
            drained = time.monotonic() - thawed_at
        if tick % 10 == 0:
            samples.append(soak_sample(gw, now))
            with open(csv, "a") as f:
                f.write(",".join(str(v) for v in samples[-1].values()) + "\n")
        tick += 1
        time.sleep(max(0.0, tick - (time.monotonic() - t0)))
    for lg in loads:
        lg.finish(120)
    if thawed_at and drained is None:
        wait_for(f"{frozen_sink} to drain", sc.drain_timeout, lambda: backlog_gone(gw, frozen_sink), 1)
        drained = time.monotonic() - thawed_at
    sub = Result(f"soak-{ingest}")
    check(ctx, sub, gw, rig, [lg.acked for lg in loads])
    res.acked += sub.acked
    for d, sd in ((res.delivered, sub.delivered), (res.lost, sub.lost), (res.dups, sub.dups)):
        for k, v in sd.items():
            d[f"{ingest}.{k}"] = v
    res.failures += [f"{ingest}: {f}" for f in sub.failures]
    res.notes += [f"{ingest}: {n}" for n in sub.notes]
    res.timings[f"{ingest}.drain_after_outage"] = fmt_s(drained)
    load_notes(res, loads)
    res.details += [f"Soak, ingest {ingest}: {secs} s at {sc.soak_rate} records/s to {', '.join(rig.sinks)}, "
                    f"{frozen_sink} frozen for {outage} s in the middle (drained {fmt_s(drained)} after SIGCONT); "
                    f"sampled every 10 s (all samples: {csv.name} in the scratch dir, kept with --keep).", "",
                    "| what | first | before the outage | peak | end | flat |", "|---|---|---|---|---|---|"]
    first, last = samples[0], samples[-1]
    ref = before_outage or first
    for key, unit, limit in (("rss_bytes", MIB, lambda a, b: b <= max(a * 1.3, a + 16 * MIB)),
                             ("fds", 1, lambda a, b: b <= a + 10),
                             ("threads", 1, lambda a, b: b <= a + 4),
                             ("wal_file_bytes", MIB, None),
                             ("wal_bytes_gauge", MIB, lambda a, b: b <= max(a * 1.5, a + 32 * MIB))):
        peak = max(s[key] for s in samples)
        flat = "-" if limit is None else ("yes" if limit(ref[key], last[key]) else "NO")
        fmt = (lambda v: f"{v / MIB:.1f} MiB") if unit == MIB else (lambda v: f"{v:.0f}")
        res.details.append(f"| {key} | {fmt(first[key])} | {fmt(ref[key])} | {fmt(peak)} | {fmt(last[key])} | {flat} |")
        res.timings[f"{ingest}.{key}"] = f"{fmt(first[key])}/{fmt(peak)}/{fmt(last[key])}".replace(" ", "")
        if flat == "NO" and key in ("rss_bytes", "fds", "threads"):
            res.failures.append(f"{ingest}: {key} did not come back flat ({fmt(ref[key])} -> {fmt(last[key])})")
    step = max(1, len(samples) // 12)
    res.details += ["", "| t | RSS | fds | threads | wal.db* files | gateway_wal_bytes | enqueued |",
                    "|---|---|---|---|---|---|---|"]
    for x in samples[::step] + ([last] if (len(samples) - 1) % step else []):
        res.details.append(f"| {x['t_s']} s | {x['rss_bytes'] / MIB:.1f} MiB | {x['fds']} | {x['threads']} | "
                           f"{x['wal_file_bytes'] / MIB:.1f} MiB | {x['wal_bytes_gauge'] / MIB:.1f} MiB | "
                           f"{x['backlog']:.0f} |")
    res.details.append("")


def soak_sample(gw, t):
    gw.check_alive()
    pid = gw.pid()
    status = Path(f"/proc/{pid}/status").read_text()

    def status_field(name):
        return int(re.search(rf"^{name}:\s+(\d+)", status, re.M).group(1))

    wal_file = sum(p.stat().st_size for p in gw.data.glob("wal.db*") if p.is_file())
    m = gw.metrics()
    return {
        "t_s": round(t),
        "rss_bytes": status_field("VmRSS") * 1024,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": status_field("Threads"),
        "wal_file_bytes": wal_file,
        "wal_bytes_gauge": metric_sum(m, "gateway_wal_bytes"),
        "backlog": metric_sum(m, "gateway_wal_records", state="enqueued"),
    }


# name -> (function, runs at these scales by default)
SCENARIOS = {
    "crash_loop": (crash_loop, {"quick", "full"}),
    "sink_outages": (sink_outages, {"quick", "full"}),
    "broker_restart": (broker_restart, {"quick", "full"}),
    "disk_full": (disk_full, {"quick", "full"}),
    "powercut": (powercut, {"quick", "full"}),
    "soak": (soak, {"full"}),
}


# ---------------------------------------------------------------------- main

class Ctx:
    """What every scenario needs: the scale, the binaries, the random source, scratch dirs."""

    def __init__(self, args):
        self.scale = QUICK if args.scale == "quick" else FULL
        bin_dir = Path(args.bin_dir).resolve()
        self.gateway_bin = bin_dir / "gateway"
        self.loadgen_bin = Path(args.loadgen).resolve() if args.loadgen else bin_dir / "loadgen"
        if not args.loadgen and not self.loadgen_bin.exists():
            for other in (ROOT / "target/release/loadgen", ROOT / "target/debug/loadgen"):
                if other.exists():
                    log(f"warning: no loadgen in {bin_dir}: using {other}")
                    self.loadgen_bin = other
                    break
        self.powercut_bin = Path(args.powercut_fs).resolve() if args.powercut_fs else bin_dir / "powercut-fs"
        if not args.powercut_fs and not self.powercut_bin.exists():
            for other in (ROOT / "target/release/powercut-fs", ROOT / "target/debug/powercut-fs"):
                if other.exists():
                    self.powercut_bin = other
                    break
        self.seed = args.seed if args.seed is not None else random.randrange(1 << 31)
        self.rng = random.Random(self.seed)
        self.soak_secs = args.soak_secs or self.scale.soak_secs
        self.outage_secs = args.outage_secs or self.scale.outage_secs
        self.soak_modes = [m.strip() for m in args.soak_modes.split(",") if m.strip()]
        self.soak_sinks = tuple(x.strip() for x in args.soak_sinks.split(",") if x.strip())
        self.soak_frozen = args.soak_frozen
        self.skip_sinks = {x.strip() for x in (args.skip_sinks or "").split(",") if x.strip()}
        if self.skip_sinks - set(ALL_SINKS) or "archive" in self.skip_sinks:
            sys.exit(f"chaos: --skip-sinks takes sinks of {', '.join(ALL_SINKS[1:])}")
        unknown = [m for m in self.soak_modes if m not in ("embedded", "mosquitto", "http")]
        unknown += [x for x in self.soak_sinks if x not in ALL_SINKS]
        if unknown or self.soak_frozen not in self.soak_sinks or self.soak_frozen == "archive":
            sys.exit(f"chaos: bad soak options (modes {args.soak_modes}, sinks {args.soak_sinks}, "
                     f"frozen {args.soak_frozen}: the frozen sink must be one of the soak's sinks, not archive)")
        self.run_tag = datetime.datetime.now().strftime("%H%M%S")
        self.run_dir = TMP_BASE / f"run-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        self.keep = args.keep

    def workdir(self, name):
        d = self.run_dir / name
        d.mkdir(parents=True, exist_ok=True)
        return d


def preflight(ctx):
    missing = [str(p) for p in (ctx.gateway_bin, ctx.loadgen_bin, TANSU, VENV_PY, Path(MOSQUITTO))
               if not Path(p).exists()]
    if not shutil.which("mosquitto_sub"):
        missing.append("mosquitto_sub")
    if missing:
        sys.exit("chaos: missing " + ", ".join(missing) + " (build the binaries; make test-deps)")


def run_scenario(ctx, name):
    fn, _ = SCENARIOS[name]
    log(f"=== {name} ({ctx.scale.name})")
    t0 = time.monotonic()
    try:
        res = fn(ctx)
    except ChaosFailure as e:
        res = Result(name, failures=[str(e)], notes=panics_in_logs(ctx.run_dir, name))
    except Exception as e:  # a harness error is a failure of the scenario, not of the run
        traceback.print_exc()
        res = Result(name, failures=[f"{type(e).__name__}: {e}"])
    finally:
        CHILDREN.stop_all()
    res.timings["total"] = fmt_s(time.monotonic() - t0)
    scratch = sorted(ctx.run_dir.glob(f"{name}*"))  # soak has one per broker
    if res.status == "FAIL" or ctx.keep:
        res.notes += [f"scratch kept in {d}" for d in scratch]
    elif scratch:
        log(f"removing {', '.join(d.name for d in scratch)} from {ctx.run_dir}")
        for d in scratch:
            shutil.rmtree(d, ignore_errors=True)
    print(res.line(), flush=True)
    return res


def panics_in_logs(run_dir, name):
    """Where a process of the scenario panicked (the gateway or a far side): a clue for a failure."""
    found = []
    for log_file in sorted(run_dir.glob(f"{name}*/**/*.log")):
        for line in log_file.read_text(errors="replace").splitlines():
            if "panicked" in line:
                found.append(f"{log_file.relative_to(run_dir)}: {line.strip()[:160]}")
                break
    return found


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "?")
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", open("/proc/meminfo").read()).group(1))
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return {
        "cpus": os.cpu_count(), "cpu": cpu, "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(), "commit": commit + (" (with uncommitted changes)" if dirty else ""),
    }


def _version(binary):
    """`gateway --version`: the commit and build time the binary was built from."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    return out or "no --version"


def write_results(path, ctx, results, started, elapsed, argv, load_before):
    hw = machine()

    def cell(d):
        return ", ".join(f"{k} {v}" for k, v in d.items()) or "-"

    lines = [
        "# Chaos results (scripts/chaos.py)", "",
        f"- date: {started:%Y-%m-%d %H:%M:%S %z}",
        f"- command: `{' '.join(argv)}` (scale {ctx.scale.name}, seed {ctx.seed}); {elapsed / 60:.1f} min",
        f"- commit: {hw['commit']} (the repository at the end of the run; the gateway binary says: {_version(ctx.gateway_bin)})",
        f"- machine: {hw['cpus']} CPUs ({hw['cpu']}), {hw['memory']} RAM, Linux {hw['kernel']}; "
        f"load average {load_before:.1f} before the run, {os.getloadavg()[0]:.1f} after "
        "(other work on the machine skews the latency figures, not the loss counts)",
        f"- binaries: {ctx.gateway_bin} ({_mtime(ctx.gateway_bin)}), {ctx.loadgen_bin} ({_mtime(ctx.loadgen_bin)})"
        + (f", {ctx.powercut_bin} ({_mtime(ctx.powercut_bin)})" if any(r.scenario == "powercut" for r in results) else ""),
        f"- load: HTTP {ctx.scale.http_rate}/s + MQTT {ctx.scale.mqtt_rate}/s through Mosquitto unless said otherwise",
        "", "Lost = acknowledged ids missing at a sink's far side after the gateway drained (must be 0); "
        "duplicates = far-side records - distinct records (at-least-once).", "",
        "| scenario | result | acknowledged | delivered (distinct) | lost | duplicates | timings | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        notes = "; ".join(r.notes + [f"**{f}**" for f in r.failures]).replace("|", "/")
        lines.append(f"| {r.scenario} | {r.status} | {r.acked} | {cell(r.delivered)} | {cell(r.lost)} | "
                     f"{cell(r.dups)} | {cell(r.timings)} | {notes} |")
    for r in results:
        if r.details:
            lines += ["", f"## {r.scenario}", ""] + r.details
    lines += ["", "## Summary lines", "", "```"] + [r.line() for r in results] + ["```", ""]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines))


def _mtime(p):
    try:
        return f"built {datetime.datetime.fromtimestamp(Path(p).stat().st_mtime):%Y-%m-%d %H:%M}"
    except OSError:
        return "missing"


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=["quick", "full"], default="quick",
                    help="quick: CI, ~3-4 min, no soak; full: `make chaos`, hours (default: quick)")
    ap.add_argument("--only", help="comma-separated scenarios: " + ", ".join(SCENARIOS))
    ap.add_argument("--bin-dir", default=str(ROOT / "target/release"), help="where gateway and loadgen are")
    ap.add_argument("--loadgen", help="loadgen binary (default: BIN_DIR/loadgen)")
    ap.add_argument("--powercut-fs", help="powercut-fs binary for the powercut scenario (default: BIN_DIR/powercut-fs)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/chaos-latest.md"),
                    help="results in markdown (default: bench/results/chaos-latest.md)")
    ap.add_argument("--seed", type=int, help="seed of the random kill times")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dirs of passing scenarios")
    ap.add_argument("--soak-secs", type=int, help="length of each soak run (default: 3600 full, 120 quick)")
    ap.add_argument("--skip-sinks", help="sink_outages without these sinks (e.g. events: tansu takes ~1k "
                    "records/s on a busy 2-core machine, so a 10-minute backlog at full load never drains)")
    ap.add_argument("--soak-modes", default="embedded,mosquitto",
                    help="ingest of the soak runs, in order: embedded, mosquitto (half the rate over "
                         "MQTT through that broker, half over HTTP) or http (HTTP only, MQTT off) "
                         "(default: embedded,mosquitto)")
    ap.add_argument("--soak-sinks", default=",".join(ALL_SINKS),
                    help="sinks of the soak runs (default: all five). At 2k records/s for an hour "
                         "tansu (SQLite storage) falls behind on a 2-core machine")
    ap.add_argument("--soak-frozen", default="api", help="the sink frozen for 10 min in each soak (default: api)")
    ap.add_argument("--outage-secs", type=int,
                    help="length of each sink_outages phase and of its baseline (default: 600 full, 10 quick)")
    args = ap.parse_args()

    ctx = Ctx(args)
    preflight(ctx)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in SCENARIOS]
        if unknown:
            sys.exit(f"chaos: unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    else:
        names = [n for n, (_, scales) in SCENARIOS.items() if ctx.scale.name in scales]
    # SIGINT too: a harness started in the background of a script has it ignored.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    started, t0, load_before = datetime.datetime.now().astimezone(), time.monotonic(), os.getloadavg()[0]
    log(f"chaos {ctx.scale.name}: {', '.join(names)} (seed {ctx.seed}; gateway {ctx.gateway_bin}; "
        f"scratch {ctx.run_dir})")
    results = []
    try:
        for name in names:
            results.append(run_scenario(ctx, name))
    except KeyboardInterrupt:
        log("interrupted: stopping every process")
        CHILDREN.stop_all()
        return 130
    finally:
        CHILDREN.stop_all()
    elapsed = time.monotonic() - t0
    write_results(args.out, ctx, results, started, elapsed, [Path(sys.argv[0]).name] + sys.argv[1:], load_before)
    failed = [r.scenario for r in results if r.status == "FAIL"]
    log(f"chaos {ctx.scale.name}: {len(results) - len(failed)}/{len(results)} passed or skipped in "
        f"{elapsed / 60:.1f} min; results in {args.out}")
    if not failed and not ctx.keep and ctx.run_dir.exists() and not any(ctx.run_dir.iterdir()):
        ctx.run_dir.rmdir()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

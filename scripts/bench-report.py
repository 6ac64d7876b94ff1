#!/usr/bin/env python3
"""The figures of `make bench` in one file: bench/results/latest.json.

    scripts/bench-report.py --reset            `make bench`, after building once
    scripts/bench-report.py [--failed "a b"]   last step

--reset empties bench/results/figures.jsonl and notes when the run started
(date, load average, git commit and whether the tree differs from it, and
`gateway --version` of the release binary: its commit and build time). Each
bench script then appends one JSON line per figure
(`figure` in scripts/bench-lib.sh; scripts/bench-routes.py writes the same
lines). The last step reads them and writes

  bench/results/latest.json  {date, started, commit, build, hardware, load
                              average, failed scripts, figures: [{name, value,
                              unit, ceiling: {name, value}, ratio, target,
                              check, met, note, source, build}]}

and appends a "Figures" table (name, value, ceiling, ratio, target, met) to
bench/results/latest.md, replacing an earlier one. ratio = value / ceiling
when a ceiling was measured in the same run; met is true/false when the figure
has a check ("ratio >= 0.95", "value < 0.5") and a value, null otherwise.
--failed names the bench scripts that exited non-zero (their figures may be
missing or partial). If HEAD moved or the binary was rebuilt during the run,
the report says so (commit_at_end, builds).

Environment: BENCH_FIGURES (default bench/results/figures.jsonl).
"""

import json
import operator
import os
import platform
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "bench", "results")
FIGURES = os.environ.get("BENCH_FIGURES") or os.path.join(RESULTS_DIR, "figures.jsonl")
LATEST_JSON = os.path.join(RESULTS_DIR, "latest.json")
LATEST_MD = os.path.join(RESULTS_DIR, "latest.md")
MD_TITLE = "## Figures (scripts/bench-report.py)"
OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}


def now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def loadavg():
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return None


def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout.rstrip("\n")
    except (OSError, subprocess.CalledProcessError):
        return None


def commit():
    full = run("git", "rev-parse", "HEAD")
    dirty = run("git", "status", "--porcelain", "--", "src", "actors", "Cargo.toml", "Cargo.lock")
    return {
        "sha": full,
        "short": full[:7] if full else None,
        "subject": (run("git", "log", "-1", "--format=%s") or "")[:120] or None,
        # The release binary is built from the working tree: say when it differs from the commit.
        "uncommitted_changes": bool(dirty) if dirty is not None else None,
        "uncommitted_paths": sorted({l[3:].split("/")[0] + ("/" if "/" in l[3:] else "") for l in (dirty or "").splitlines()}),
    }


def gateway_build():
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    if not os.path.isabs(target):
        target = os.path.join(ROOT, target)
    gw = os.path.join(target, os.environ.get("BENCH_PROFILE", "dist"), "gateway")
    return run(gw, "--version") if os.access(gw, os.X_OK) else None


def hardware():
    cpu = None
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 1048576, 1)
    except OSError:
        pass
    # The benches keep their data dirs under the cargo target dir (never /tmp).
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    if not os.path.isabs(target):
        target = os.path.join(ROOT, target)
    fs = None
    df = run("df", "-PT", target if os.path.exists(target) else ROOT)
    if df and len(df.splitlines()) > 1:
        f = df.splitlines()[1].split()
        fs = {"type": f[1], "device": f[0], "mount": f[6], "path": target}
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": mem,
        "kernel": f"{platform.system()} {platform.release()}",
        "data_filesystem": fs,
    }


def read_figures():
    meta, figs = {}, []
    if not os.path.exists(FIGURES):
        return meta, figs
    with open(FIGURES) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                print(f"bench-report: {FIGURES}:{n}: not JSON, skipped", file=sys.stderr)
                continue
            if "meta" in obj:
                meta.update(obj["meta"])
            else:
                figs.append(obj)
    return meta, figs


def evaluate(fig):
    value = fig.get("value")
    ceiling = (fig.get("ceiling") or {}).get("value")
    ratio = None
    if isinstance(value, (int, float)) and isinstance(ceiling, (int, float)) and ceiling > 0:
        ratio = round(value / ceiling, 4)
    met = None
    check = fig.get("check")
    if check:
        m = re.fullmatch(r"\s*(value|ratio)\s*(>=|<=|==|<|>)\s*(-?[\d.]+)\s*", check)
        if not m:
            print(f"bench-report: {fig.get('name')}: cannot read check {check!r}", file=sys.stderr)
        else:
            subject = ratio if m.group(1) == "ratio" else value
            if isinstance(subject, (int, float)):
                met = OPS[m.group(2)](subject, float(m.group(3)))
    out = {
        "name": fig.get("name"),
        "value": value,
        "unit": fig.get("unit"),
        "ceiling": fig.get("ceiling"),
        "ratio": ratio,
        "target": fig.get("target"),
        "check": check,
        "met": met,
    }
    for k in ("note", "source", "time"):
        if fig.get(k) is not None:
            out[k] = fig[k]
    return out


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:.0f}"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def markdown(report):
    c = report["commit"]
    hw = report["hardware"]
    fs = hw.get("data_filesystem") or {}
    lines = [
        MD_TITLE,
        "",
        f"{report['date']}, commit {c.get('short') or 'unknown'}"
        + (" (+ uncommitted changes in " + ", ".join(c["uncommitted_paths"]) + ")" if c.get("uncommitted_changes") else "")
        + f"; {hw.get('nproc')} × {hw.get('cpu_model') or 'unknown CPU'}, {hw.get('memory_gib')} GiB, {hw.get('kernel')},"
        + f" data on {fs.get('type', 'unknown')} ({fs.get('device', '?')} on {fs.get('mount', '?')});"
        + f" load average at start {' '.join(map(str, report.get('loadavg_start') or [])) or 'n/a'},"
        + f" at end {' '.join(map(str, report.get('loadavg_end') or [])) or 'n/a'}."
        + " Ratio = value / ceiling, both measured in this run. Also in `bench/results/latest.json`.",
        "",
    ]
    if report.get("build"):
        lines += [f"Binary: `{report['build']}`." + (
            " **The release binary changed during the run**; builds seen: " + "; ".join(f"`{b}`" for b in report["builds"])
            + " (each figure's build is in latest.json)." if report["binary_changed_during_run"] else ""), ""]
    if report.get("commit_at_end"):
        e = report["commit_at_end"]
        lines += [f"HEAD moved during the run: {e.get('short')}" + (" (+ uncommitted changes)" if e.get("uncommitted_changes") else "")
                  + " at the end.", ""]
    if report.get("failed_scripts"):
        lines += [f"Scripts that failed (figures may be missing): {', '.join(report['failed_scripts'])}.", ""]
    lines += ["| figure | value | ceiling | ratio | target | met |", "|---|---:|---|---:|---|---|"]
    for f in report["figures"]:
        ceil = f.get("ceiling") or {}
        ceil_txt = f"{fmt(ceil.get('value'))} ({ceil.get('name')})" if ceil else "-"
        met = {True: "yes", False: "**no**", None: "-"}[f["met"]]
        lines.append(
            f"| {f['name']} | {fmt(f['value'])} {f.get('unit') or ''} | {ceil_txt} | {fmt(f['ratio'])} | "
            f"{(f.get('target') or '-').replace('|', '/')} | {met} |")
    return "\n".join(lines) + "\n"


def write_md(section):
    text = open(LATEST_MD).read() if os.path.exists(LATEST_MD) else "# Gateway benchmark results\n"
    # Drop an earlier Figures section (from its heading to the next heading of level 2 or 3).
    out, skip = [], False
    for line in text.splitlines():
        if line.startswith(MD_TITLE):
            skip = True
            continue
        if skip and re.match(r"#{2,3} ", line):
            skip = False
        if not skip:
            out.append(line)
    while out and not out[-1].strip():
        out.pop()
    tmp = LATEST_MD + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(out) + "\n\n" + section)
    os.replace(tmp, LATEST_MD)


def main(argv):
    os.makedirs(RESULTS_DIR, exist_ok=True)
    if argv[:1] == ["--reset"]:
        with open(FIGURES, "w") as f:
            f.write(json.dumps({"meta": {"started": now(), "loadavg_start": loadavg(), "commit": commit(),
                                         "build": gateway_build()}}) + "\n")
        print(f"==> {os.path.relpath(FIGURES, ROOT)} reset", file=sys.stderr)
        return 0
    failed = []
    if argv[:1] == ["--failed"] and len(argv) > 1:
        failed = argv[1].split()
    elif argv:
        print(__doc__, file=sys.stderr)
        return 2
    meta, figs = read_figures()
    start_commit, end_commit = meta.get("commit"), commit()
    build = meta.get("build")
    builds = sorted({b for b in [build] + [f.get("build") for f in figs] if b})
    report = {
        "date": now(),
        "started": meta.get("started"),
        # The commit (and tree state) the run was built from: at its start.
        "commit": start_commit or end_commit,
        "commit_at_end": end_commit if start_commit and (end_commit.get("sha"), end_commit.get("uncommitted_changes"))
        != (start_commit.get("sha"), start_commit.get("uncommitted_changes")) else None,
        "build": build,
        "builds": builds,
        "binary_changed_during_run": len(builds) > 1,
        "hardware": hardware(),
        "loadavg_start": meta.get("loadavg_start"),
        "loadavg_end": loadavg(),
        "failed_scripts": failed,
        "figures": [evaluate(f) for f in figs],
    }
    tmp = LATEST_JSON + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    os.replace(tmp, LATEST_JSON)
    section = markdown(report)
    write_md(section)
    print(section)
    met = [f["met"] for f in report["figures"]]
    print(f"==> {len(figs)} figures ({met.count(True)} targets met, {met.count(False)} missed) in "
          f"{os.path.relpath(LATEST_JSON, ROOT)} and {os.path.relpath(LATEST_MD, ROOT)}", file=sys.stderr)
    return 0


sys.exit(main(sys.argv[1:]))

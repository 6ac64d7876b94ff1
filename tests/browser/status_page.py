#!/usr/bin/env python3
"""The status page (DESIGN §12) in a real headless Chromium, against the real
gateway binary and a real HTTP analytics sink server
(tests/support/analytics_server.py, which this script starts, stops and starts
again). Run by tests/api/status_page.rs, so `make test` runs it.

Steps: a wrong token shows an error and no data; the right one shows the
data; an HTTP ingest moves the record count; the sink's server stopped turns
the sink "Down" with its backlog growing; pause and resume from the page, and
the admin API agrees; a replay from the page is delivered; a stopped gateway
shows "Stale"; requeue and purge from the page (sink "bad", whose server
refuses every batch with 400); the browser console has no errors and no CSP violations;
screenshots at 360 and 1920 px go to --artifacts.

Always Debian's /usr/bin/chromedriver and /usr/bin/chromium: no driver or
browser is ever downloaded (SE_OFFLINE, no Selenium Manager).

usage: status_page.py --base URL --token FILE --analytics-port N
                      --analytics-out FILE --refuser-port N --gateway-pid PID
                      --artifacts DIR
"""

import argparse
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

os.environ["SE_OFFLINE"] = "true"

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ANALYTICS = os.path.join(HERE, "..", "support", "analytics_server.py")
SINK = "api"

# Records every CSP violation from the first line of every document (a CDP
# script runs before the page's own and is not subject to its CSP).
CSP_WATCH = """
window.__csp = [];
document.addEventListener('securitypolicyviolation', function (e) {
  window.__csp.push(e.violatedDirective + ' ' + e.blockedURI);
});
"""


def step(msg):
    print("step: " + msg, flush=True)


class Analytics:
    def __init__(self, port, out):
        self.port, self.out, self.proc = port, out, None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, ANALYTICS, str(self.port), self.out])
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("the analytics server did not start")

    def stop(self):
        if self.proc:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def lines(self):
        try:
            with open(self.out, "rb") as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []


class Refuser(http.server.BaseHTTPRequestHandler):
    """Sink "bad"'s server: refuses every batch with 400 (a permanent
    error), so its records become dead letters at once."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b'{"error":"schema mismatch"}'
        self.send_response(400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def start_refuser(port):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Refuser)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class Gateway:
    def __init__(self, base, token):
        self.base, self.token = base, token

    def call(self, method, path, body=None, auth=True):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if auth:
            req.add_header("Authorization", "Bearer " + self.token)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def ingest(self, device, msg_id):
        body = {"msg_id": msg_id, "ts": "2026-11-25T08:00:00.123Z", "metrics": {"temperature_c": 1.0}}
        status, _ = self.call("POST", "/ingest/" + device, body, auth=False)
        assert status == 202, status

    def sink(self, name):
        _, sinks = self.call("GET", "/admin/sinks")
        return next(s for s in sinks if s["name"] == name)


def wait(driver, what, cond, timeout=20):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: cond())
    except TimeoutException:
        raise AssertionError("timed out waiting for: " + what) from None


def text(driver, css):
    # One script call: the page re-renders every second, so an element
    # found in one call may be gone in the next.
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.textContent.trim() : ''", css)


class Console:
    """The browser console, drained step by step; allowed messages are
    expected network errors of the step that produces them (a 401 for a
    wrong token, a failed poll while the gateway is stopped)."""

    def __init__(self, driver):
        self.driver, self.bad = driver, []

    def drain(self, allow_network=None):
        for e in self.driver.get_log("browser"):
            msg = e.get("message", "")
            if allow_network and e.get("source") == "network" and allow_network in msg:
                continue
            if e.get("level") in ("SEVERE", "WARNING") or "Content Security Policy" in msg:
                self.bad.append(e)


def sink_state(driver):
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.dataset.state : null",
        "#sink-%s .sink-state" % SINK)


def sink_backlog(driver):
    t = text(driver, "#sink-%s .sink-backlog" % SINK)
    return int(t) if t.isdigit() else -1


def confirm(driver, expect_question):
    dialog = driver.find_element(By.ID, "confirm")
    wait(driver, "the confirmation dialog", lambda: dialog.get_attribute("open") is not None)
    q = driver.find_element(By.ID, "confirm-text").text
    assert expect_question in q, q
    driver.find_element(By.ID, "confirm-ok").click()
    wait(driver, "the dialog closed", lambda: dialog.get_attribute("open") is None)


def screenshot(driver, width, path):
    driver.set_window_size(width, 900)
    time.sleep(0.3)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, max(600, min(int(height) + 140, 4000)))
    time.sleep(1.2)
    # No sideways scrolling of the page itself (tables scroll inside their card).
    overflow = driver.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, "the page scrolls sideways by %spx at %s px" % (overflow, width)
    driver.save_screenshot(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--token", required=True, help="the admin token file")
    ap.add_argument("--analytics-port", type=int, required=True)
    ap.add_argument("--analytics-out", required=True)
    ap.add_argument("--gateway-pid", type=int, required=True)
    ap.add_argument("--refuser-port", type=int, required=True, help="sink bad's server (400 to all)")
    ap.add_argument("--artifacts", required=True)
    a = ap.parse_args()
    os.makedirs(a.artifacts, exist_ok=True)
    token = open(a.token).read().strip()
    gw = Gateway(a.base, token)
    analytics = Analytics(a.analytics_port, a.analytics_out)
    analytics.start()
    refuser = start_refuser(a.refuser_port)

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1920,1080", "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    console = Console(driver)
    try:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": CSP_WATCH})
        driver.get(a.base + "/")

        step("signed out: the form, no data")
        wait(driver, "the sign-in form", lambda: driver.find_element(By.ID, "token").is_displayed())
        assert not driver.find_element(By.ID, "data").is_displayed()
        console.drain(allow_network="/admin/status")  # the first poll, without a token: 401

        step("a wrong token: an error, no data")
        field = driver.find_element(By.ID, "token")
        field.send_keys("not-the-admin-token-0000")
        field.send_keys(Keys.ENTER)
        wait(driver, "the sign-in error", lambda: driver.find_element(By.ID, "signin-error").is_displayed())
        assert "refused" in text(driver, "#signin-error").lower(), text(driver, "#signin-error")
        assert not driver.find_element(By.ID, "data").is_displayed()
        assert text(driver, "#gw-id") == "" and not driver.find_elements(By.CSS_SELECTOR, "#sink-rows tr")
        assert driver.execute_script("return sessionStorage.length") == 0
        console.drain(allow_network="/admin/status")  # the refused poll: 401

        step("the right token: the data, the token not in the URL")
        field = driver.find_element(By.ID, "token")
        field.send_keys(token)
        driver.find_element(By.ID, "signin-button").click()
        wait(driver, "the data", lambda: driver.find_element(By.ID, "data").is_displayed())
        wait(driver, "the gateway id", lambda: text(driver, "#gw-id") != "")
        assert token not in driver.current_url
        assert not driver.find_element(By.ID, "signin").is_displayed()
        wait(driver, "live", lambda: text(driver, "#conn").startswith("Live"))

        step("an HTTP ingest moves the record count")
        before = int(text(driver, "#ingest-total-http"))
        for i in range(3):
            gw.ingest("dev-b", "m%d" % i)
        wait(driver, "the count +3", lambda: text(driver, "#ingest-total-http") == str(before + 3))
        wait(driver, "sink up", lambda: sink_state(driver) == "up")
        wait(driver, "delivered", lambda: len(analytics.lines()) >= 3)
        wait(driver, "backlog 0", lambda: sink_backlog(driver) == 0)

        step("the sink's server stopped: Down, the backlog growing")
        analytics.stop()
        for i in range(3):
            gw.ingest("dev-b", "d%d" % i)
        wait(driver, "sink down", lambda: sink_state(driver) == "down")
        assert text(driver, "#sink-%s .sink-state" % SINK) == "Down"
        b1 = sink_backlog(driver)
        assert b1 >= 3, b1
        for i in range(4):
            gw.ingest("dev-b", "e%d" % i)
        wait(driver, "the backlog growing", lambda: sink_backlog(driver) >= b1 + 4)
        assert "connect" in text(driver, "#sink-%s .err" % SINK).lower() or text(driver, "#sink-%s .err" % SINK) != "none"

        step("screenshots at 1920 and 360 px (the sink down, its backlog, its error)")
        screenshot(driver, 1920, os.path.join(a.artifacts, "status-1920.png"))
        screenshot(driver, 360, os.path.join(a.artifacts, "status-360.png"))
        driver.set_window_size(1920, 1080)

        step("pause from the page (keyboard), the admin API agrees")
        btn = driver.find_element(By.ID, "sink-action-" + SINK)
        assert btn.text == "Pause"
        btn.send_keys(Keys.ENTER)
        # Escape cancels: nothing happens.
        wait(driver, "the dialog", lambda: driver.find_element(By.ID, "confirm").get_attribute("open") is not None)
        driver.switch_to.active_element.send_keys(Keys.ESCAPE)
        time.sleep(0.3)
        assert gw.sink(SINK)["state"]["paused"] is False
        driver.find_element(By.ID, "sink-action-" + SINK).send_keys(Keys.ENTER)
        confirm(driver, "Pause delivery to sink " + SINK)
        wait(driver, "the result", lambda: "paused" in text(driver, "#result"))
        assert gw.sink(SINK)["state"]["paused"] is True
        assert gw.sink(SINK)["condition"] == "paused"
        wait(driver, "Paused on the page", lambda: sink_state(driver) == "paused")
        assert text(driver, "#sink-%s .sink-state" % SINK) == "Paused"

        step("the server back, resume from the page: delivered")
        analytics.start()
        driver.find_element(By.ID, "sink-action-" + SINK).click()
        confirm(driver, "Resume delivery to sink " + SINK)
        wait(driver, "the result", lambda: "resumed" in text(driver, "#result"))
        assert gw.sink(SINK)["state"]["paused"] is False
        wait(driver, "sink up again", lambda: sink_state(driver) == "up", timeout=30)
        wait(driver, "backlog 0 again", lambda: sink_backlog(driver) == 0, timeout=30)
        assert len(analytics.lines()) >= 10, len(analytics.lines())

        step("replay the last hour from the page: delivered again")
        delivered = len(analytics.lines())
        driver.find_element(By.ID, "replay-button").click()
        confirm(driver, "to sink " + SINK)
        wait(driver, "the replay result", lambda: "queued again" in text(driver, "#result"))
        result = text(driver, "#result")
        matched = int(result.split(": ")[1].split(" ")[0])
        assert matched >= 10, result
        wait(driver, "the replay delivered", lambda: len(analytics.lines()) >= delivered + matched, timeout=30)

        step("requeue, then purge the dead letters of sink bad from the page")
        bad = "bad"
        wait(driver, "bad's records all dead", lambda: gw.sink(bad)["wal"]["dead"] > 0
             and gw.sink(bad)["wal"]["enqueued"] + gw.sink(bad)["wal"]["inflight"] == 0, timeout=30)
        dead = gw.sink(bad)["wal"]["dead"]
        wait(driver, "the requeue button", lambda: driver.find_elements(By.ID, "dlq-requeue-" + bad))
        wait(driver, "the dead letters listed", lambda: "bad" in text(driver, "#dlq-rows"))
        driver.find_element(By.ID, "dlq-requeue-" + bad).click()
        confirm(driver, "Requeue the")
        wait(driver, "the requeue result", lambda: "Requeued" in text(driver, "#result"))
        assert text(driver, "#result") == "Requeued %d dead letters of bad." % dead, text(driver, "#result")
        # They fail again (the server is not there) and come back as dead letters.
        wait(driver, "dead again", lambda: gw.sink(bad)["wal"]["dead"] == dead
             and gw.sink(bad)["wal"]["enqueued"] + gw.sink(bad)["wal"]["inflight"] == 0, timeout=30)
        wait(driver, "the purge button", lambda: driver.find_elements(By.ID, "dlq-purge-" + bad)
             and driver.find_element(By.ID, "dlq-purge-" + bad).is_displayed())
        driver.find_element(By.ID, "dlq-purge-" + bad).click()
        confirm(driver, "for good")
        wait(driver, "the purge result", lambda: "Purged" in text(driver, "#result"))
        assert text(driver, "#result") == "Purged %d dead letters of bad." % dead, text(driver, "#result")
        _, listed = gw.call("GET", "/admin/dlq?sink=bad")
        assert listed["total"] == 0, listed
        wait(driver, "no dead letters on the page", lambda: text(driver, "#dlq-total") == "No dead letters.")

        step("a stopped gateway: Stale, in words; then Live again")
        os.kill(a.gateway_pid, signal.SIGSTOP)
        try:
            wait(driver, "stale", lambda: text(driver, "#conn").startswith("Stale"), timeout=10)
        finally:
            os.kill(a.gateway_pid, signal.SIGCONT)
        wait(driver, "live again", lambda: text(driver, "#conn").startswith("Live"), timeout=15)
        console.drain(allow_network="/admin/status")  # the aborted polls

        step("accessibility basics: labels, table headers, focusable actions")
        for el in driver.find_elements(By.CSS_SELECTOR, "input, select"):
            if el.is_displayed():
                ident = el.get_attribute("id")
                assert driver.find_elements(By.CSS_SELECTOR, "label[for='%s']" % ident), ident
        assert driver.find_elements(By.CSS_SELECTOR, "#sink-rows th[scope='row']")


        step("no console errors, no CSP violations")
        console.drain()
        csp = driver.execute_script("return window.__csp")
        assert csp == [], "CSP violations: %s" % csp
        assert console.bad == [], "console: %s" % json.dumps(console.bad, indent=1)
        print("ok: status page", flush=True)
    except Exception:
        try:
            driver.save_screenshot(os.path.join(a.artifacts, "failure.png"))
            with open(os.path.join(a.artifacts, "failure.html"), "w") as f:
                f.write(driver.page_source)
        except Exception:
            pass
        raise
    finally:
        driver.quit()
        analytics.stop()
        refuser.shutdown()


if __name__ == "__main__":
    main()

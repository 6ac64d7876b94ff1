// The gateway's status page (DESIGN §12). Polls GET /admin/status once a
// second; every action calls the admin API's own endpoint. The admin token
// lives in sessionStorage (this tab only) and travels in the Authorization
// header, never in a URL. No inline script or style: the CSP forbids both.
"use strict";

(function () {
  const TOKEN_KEY = "gateway-admin-token";
  const POLL_MS = 1000;
  const STALE_MS = 3000;

  const $ = (id) => document.getElementById(id);
  let token = sessionStorage.getItem(TOKEN_KEY);
  let signedIn = false;
  let lastOk = 0;
  let lastDoc = null;
  let timer = null;
  let inFlight = null;

  function headers(extra) {
    const h = Object.assign({ Accept: "application/json" }, extra || {});
    if (token) h.Authorization = "Bearer " + token;
    return h;
  }

  async function api(method, path, body) {
    const opts = { method: method, headers: headers(), cache: "no-store", credentials: "same-origin" };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    const res = await fetch(path, opts);
    let data = null;
    try { data = await res.json(); } catch (e) { data = null; }
    return { status: res.status, ok: res.ok, data: data };
  }

  function errorText(r) {
    if (r.data && r.data.error) return r.data.error.message + " (" + r.data.error.code + ")";
    return "HTTP " + r.status;
  }

  // --- formatting -------------------------------------------------------
  function bytes(n) {
    if (n === null || n === undefined) return "not known";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    let v = n;
    while (v >= 1000 && i < units.length - 1) { v /= 1000; i++; }
    return (i === 0 ? v : v.toFixed(1)) + " " + units[i];
  }

  function duration(s) {
    if (s === null || s === undefined) return "none";
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }

  const STATE_WORDS = {
    up: "Up",
    down: "Down",
    paused: "Paused",
    circuit_open: "Circuit open",
    rejecting: "Rejecting",
    stopped: "Stopped",
  };

  function text(el, t) { el.textContent = t; return el; }

  function cell(row, t, cls) {
    const td = document.createElement("td");
    td.textContent = t;
    if (cls) td.className = cls;
    row.appendChild(td);
    return td;
  }

  // A small bar chart of counts per interval, drawn as SVG attributes (not
  // inline styles, which the CSP refuses).
  function chart(points, label) {
    const NS = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(NS, "svg");
    const w = 150, h = 30;
    svg.setAttribute("viewBox", "0 0 " + w + " " + h);
    svg.setAttribute("class", "chart");
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", label);
    const max = Math.max(1, ...points);
    const bw = w / Math.max(points.length, 1);
    points.forEach(function (p, i) {
      const r = document.createElementNS(NS, "rect");
      const bh = Math.max(p > 0 ? 1 : 0, (p / max) * h);
      r.setAttribute("x", (i * bw).toFixed(1));
      r.setAttribute("y", (h - bh).toFixed(1));
      r.setAttribute("width", Math.max(bw - 1, 1).toFixed(1));
      r.setAttribute("height", bh.toFixed(1));
      svg.appendChild(r);
    });
    return svg;
  }

  function button(label, cls, onClick) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    if (cls) b.className = cls;
    b.addEventListener("click", onClick);
    return b;
  }

  // --- rendering --------------------------------------------------------
  function render(doc) {
    const g = doc.gateway;
    text($("gw-id"), g.id);
    text($("gw-version"), g.version);
    text($("gw-uptime"), duration(g.uptime_s));
    text($("gw-bundle"), !g.bundle ? "none" : g.bundle.version ? `${g.bundle.version} (${g.bundle.status})` : g.bundle.status);
    const mq = g.mqtt;
    const mqtt = $("gw-mqtt");
    text(mqtt, mq.state === "connected" ? "Connected" : mq.state === "disabled" ? "Disabled" : "Disconnected" + (mq.detail ? ": " + mq.detail : ""));
    mqtt.className = "state state-" + (mq.state === "connected" ? "up" : mq.state === "disabled" ? "paused" : "down");

    const ingest = $("ingest-rows");
    ingest.replaceChildren();
    Object.keys(doc.ingest.sources).forEach(function (src) {
      const s = doc.ingest.sources[src];
      const tr = document.createElement("tr");
      const th = document.createElement("th");
      th.scope = "row";
      th.textContent = src.toUpperCase();
      tr.appendChild(th);
      const total = cell(tr, String(s.total), "num");
      total.id = "ingest-total-" + src;
      cell(tr, String(s.per_s), "num");
      const c = cell(tr, "");
      c.appendChild(chart(s.points, src + ": records per " + doc.ingest.interval_s + " s over the last " + s.points.length + " intervals, newest " + s.points[s.points.length - 1]));
      ingest.appendChild(tr);
    });

    const wal = doc.wal;
    const used = wal.limit_bytes ? wal.bytes / wal.limit_bytes : 0;
    $("wal-meter").value = Math.min(used, 1);
    text($("wal-used"), bytes(wal.bytes) + " of " + bytes(wal.limit_bytes) + " (" + (used * 100).toFixed(1) + " %)");
    text($("wal-free"), bytes(wal.disk_free_bytes));
    text($("wal-full"), wal.full_in_s === null ? "Not known (not filling, or not measured)" : duration(wal.full_in_s));
    const bp = $("wal-bp");
    text(bp, wal.backpressure ? "Refused: backpressure (disk protection)" : "Accepted");
    bp.className = "state state-" + (wal.backpressure ? "down" : "up");

    renderSinks(doc.sinks);
    renderDead(doc.dead_letters, doc.sinks);
  }

  // Rows are built once per sink and updated in place, so a focused button
  // keeps its focus (and its identity) across the 1 s updates.
  function sinkRow(body, name) {
    let tr = $("sink-" + name);
    if (tr) return tr;
    tr = document.createElement("tr");
    tr.id = "sink-" + name;
    const th = document.createElement("th");
    th.scope = "row";
    th.textContent = name;
    tr.appendChild(th);
    // data-label: the column's name, shown before each value on a phone,
    // where the rows stack (status.css).
    [["state sink-state", "State"], ["num sink-backlog", "Backlog"], ["num sink-oldest", "Oldest pending"],
     ["num sink-rate", "Delivered per second"], ["num sink-dead", "Dead letters"], ["err", "Last error"]].forEach(function (c) {
      cell(tr, "", c[0]).dataset.label = c[1];
    });
    const actions = cell(tr, "", "actions");
    actions.dataset.label = "Actions";
    const b = button("Pause", "pause", function () {
      const paused = b.dataset.paused === "true";
      const verb = paused ? "resume" : "pause";
      confirmThen((paused ? "Resume" : "Pause") + " delivery to sink " + name + "?", function () {
        return api("POST", "/admin/sinks/" + encodeURIComponent(name) + "/" + verb).then(function (r) {
          return r.ok ? "Sink " + name + ": " + (paused ? "resumed" : "paused") + "." : "Sink " + name + ": " + errorText(r);
        });
      });
    });
    b.id = "sink-action-" + name;
    actions.appendChild(b);
    body.appendChild(tr);
    return tr;
  }

  function renderSinks(sinks) {
    const body = $("sink-rows");
    const names = sinks.map(function (s) { return s.name; });
    Array.from(body.children).forEach(function (tr) {
      if (names.indexOf(tr.id.slice(5)) < 0) tr.remove();
    });
    sinks.forEach(function (s) {
      const tr = sinkRow(body, s.name);
      const st = tr.querySelector(".sink-state");
      st.textContent = STATE_WORDS[s.condition] || s.condition;
      st.className = "state sink-state state-" + s.condition;
      st.dataset.state = s.condition;
      tr.querySelector(".sink-backlog").textContent = String(s.backlog);
      tr.querySelector(".sink-oldest").textContent = s.oldest_pending_age_s === null ? "none" : duration(s.oldest_pending_age_s);
      tr.querySelector(".sink-rate").textContent = s.delivered_per_s === null ? "" : String(s.delivered_per_s);
      tr.querySelector(".sink-dead").textContent = String(s.dead_letters);
      tr.querySelector(".err").textContent = s.last_error || "none";
      const b = $("sink-action-" + s.name);
      const paused = s.condition === "paused";
      b.dataset.paused = String(paused);
      b.textContent = paused ? "Resume" : "Pause";
      b.className = paused ? "resume" : "pause";
      b.setAttribute("aria-label", (paused ? "Resume" : "Pause") + " sink " + s.name);
    });

    const sel = $("replay-sink");
    if (sel.options.length !== names.length) {
      const keep = sel.value;
      sel.replaceChildren();
      names.forEach(function (n) {
        const o = document.createElement("option");
        o.value = n;
        o.textContent = n;
        sel.appendChild(o);
      });
      if (names.indexOf(keep) >= 0) sel.value = keep;
    }
  }

  function renderDead(dead, sinks) {
    text($("dlq-total"), dead.total === 0 ? "No dead letters." : dead.total + " dead letters (showing the first " + dead.recent.length + ").");
    $("dlq-table").hidden = dead.recent.length === 0;
    const body = $("dlq-rows");
    body.replaceChildren();
    dead.recent.forEach(function (d) {
      const tr = document.createElement("tr");
      cell(tr, d.sink);
      cell(tr, String(d.seq), "num");
      cell(tr, d.device_id);
      cell(tr, new Date(d.dead_ms).toISOString());
      cell(tr, String(d.attempts), "num");
      cell(tr, d.reason, "err");
      body.appendChild(tr);
    });
    // Requeue / purge per sink that has dead letters.
    const sec = $("dlq-total");
    let bar = $("dlq-actions");
    if (!bar) {
      bar = document.createElement("div");
      bar.id = "dlq-actions";
      bar.className = "buttons";
      sec.after(bar);
    }
    // Rebuilt only when the counts change, so focus stays put.
    const withDead = sinks.filter(function (s) { return s.dead_letters > 0; });
    const key = withDead.map(function (s) { return s.name + ":" + s.dead_letters; }).join(",");
    if (bar.dataset.key === key) return;
    bar.dataset.key = key;
    bar.replaceChildren();
    withDead.forEach(function (s) {
      const rq = button("Requeue " + s.name + " (" + s.dead_letters + ")", "requeue", function () {
        confirmThen("Requeue the " + s.dead_letters + " dead letters of sink " + s.name + " for delivery?", function () {
          return api("POST", "/admin/dlq/requeue", { sink: s.name }).then(function (r) {
            return r.ok ? "Requeued " + r.data.requeued + " dead letters of " + s.name + "." : "Requeue: " + errorText(r);
          });
        });
      });
      rq.id = "dlq-requeue-" + s.name;
      const pg = button("Purge " + s.name + " (" + s.dead_letters + ")", "danger", function () {
        confirmThen("Delete the " + s.dead_letters + " dead letters of sink " + s.name + " for good? This cannot be undone.", function () {
          return api("DELETE", "/admin/dlq?sink=" + encodeURIComponent(s.name)).then(function (r) {
            return r.ok ? "Purged " + r.data.purged + " dead letters of " + s.name + "." : "Purge: " + errorText(r);
          });
        });
      });
      pg.id = "dlq-purge-" + s.name;
      bar.appendChild(rq);
      bar.appendChild(pg);
    });
  }

  // --- confirmation dialog ----------------------------------------------
  let pending = null;
  let opener = null;

  function confirmThen(question, action) {
    pending = action;
    opener = document.activeElement;
    text($("confirm-text"), question);
    $("confirm").showModal();
    $("confirm-cancel").focus();
  }

  function closeDialog() {
    const d = $("confirm");
    if (d.open) d.close();
    pending = null;
    if (opener && opener.isConnected) opener.focus();
  }

  function showResult(msg, ok) {
    const r = $("result");
    r.textContent = msg;
    r.className = "result " + (ok ? "result-ok" : "result-error");
  }

  // --- polling and connection state --------------------------------------
  function setConn(state, msg) {
    const c = $("conn");
    c.textContent = msg;
    c.className = "conn conn-" + state;
    c.dataset.state = state;
  }

  function showSignedIn(on) {
    signedIn = on;
    $("signin").hidden = on;
    $("data").hidden = !on;
    $("signout").hidden = !on || !token;
  }

  async function poll() {
    timer = null;
    const ctl = new AbortController();
    inFlight = ctl;
    const cut = setTimeout(function () { ctl.abort(); }, STALE_MS);
    try {
      const res = await fetch("/admin/status", { headers: headers(), cache: "no-store", signal: ctl.signal });
      if (res.status === 401 || res.status === 403) {
        const body = await res.json().catch(function () { return null; });
        signOut(body && body.error ? body.error.message : "refused");
        return;
      }
      if (!res.ok) throw new Error("HTTP " + res.status);
      const doc = await res.json();
      lastOk = Date.now();
      lastDoc = doc;
      if (!signedIn) showSignedIn(true);
      render(doc);
      setConn("live", "Live: updated " + new Date(lastOk).toLocaleTimeString());
    } catch (e) {
      // Shown by the staleness check below.
    } finally {
      clearTimeout(cut);
      inFlight = null;
    }
    schedule();
  }

  function schedule() {
    if (timer === null) timer = setTimeout(poll, POLL_MS);
  }

  function checkStale() {
    if (!signedIn || !lastOk) return;
    const age = Date.now() - lastOk;
    if (age > STALE_MS) {
      setConn("stale", "Stale: no answer from the gateway for " + Math.round(age / 1000) + " s; the figures below are old");
    }
  }

  function signOut(reason) {
    if (timer !== null) { clearTimeout(timer); timer = null; }
    if (inFlight) inFlight.abort();
    const hadToken = !!token;
    token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    lastOk = 0;
    lastDoc = null;
    showSignedIn(false);
    // Drop the figures: without credentials the page shows no data.
    ["ingest-rows", "sink-rows", "dlq-rows"].forEach(function (id) { $(id).replaceChildren(); });
    setConn("none", "Not signed in");
    if (reason && hadToken) {
      const e = $("signin-error");
      e.textContent = "Sign-in refused: " + reason;
      e.hidden = false;
    }
  }

  function init() {
    $("signin-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      const t = $("token").value.trim();
      $("token").value = "";
      if (!t) {
        const e = $("signin-error");
        e.textContent = "Enter the admin token.";
        e.hidden = false;
        return;
      }
      $("signin-error").hidden = true;
      token = t;
      sessionStorage.setItem(TOKEN_KEY, t);
      if (timer !== null) { clearTimeout(timer); timer = null; }
      poll();
    });
    $("signout").addEventListener("click", function () { signOut(null); });
    $("confirm-cancel").addEventListener("click", function () {
      closeDialog();
      showResult("Cancelled.", true);
    });
    $("confirm").addEventListener("cancel", function () { pending = null; });
    $("confirm-ok").addEventListener("click", function () {
      const action = pending;
      closeDialog();
      if (!action) return;
      showResult("Working…", true);
      action().then(function (msg) {
        showResult(msg, !/error|HTTP|refused|not /i.test(msg));
        if (timer !== null) { clearTimeout(timer); timer = null; }
        poll();
      }, function (e) {
        showResult("Failed: " + e.message, false);
      });
    });
    $("replay-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      const sink = $("replay-sink").value;
      const since = $("replay-since").value.trim();
      const until = $("replay-until").value.trim();
      confirmThen("Deliver the records received from " + since + " to " + until + " to sink " + sink + " again?", function () {
        return api("POST", "/admin/replay", { sink: sink, since: since, until: until }).then(function (r) {
          return r.ok ? "Replay to " + sink + ": " + r.data.matched + " records in the range, " + r.data.replayed + " queued again, " + r.data.already_pending + " still pending." : "Replay: " + errorText(r);
        });
      });
    });
    const now = new Date();
    $("replay-since").value = new Date(now.getTime() - 3600 * 1000).toISOString();
    $("replay-until").value = new Date(now.getTime() + 3600 * 1000).toISOString();
    setInterval(checkStale, 500);
    // With a token from this tab, or an admin client certificate (no
    // token), the first poll signs in; otherwise the form stays.
    poll();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();

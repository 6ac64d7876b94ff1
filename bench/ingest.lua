-- wrk script for the gateway's HTTP ingest (used by scripts/bench.sh).
--
--   wrk -t2 -c256 -d15s --latency -s bench/ingest.lua http://127.0.0.1:PORT -- RUN_ID [DEVICES] [DELAY_MS]
--
-- DELAY_MS (default 0, as fast as possible) paces each connection: C
-- connections give about C * 1000 / DELAY_MS requests/s (the soak uses it).
-- Every request is a unique telemetry record: msg_id = RUN_ID-THREAD-COUNTER,
-- spread over DEVICES device ids (default 50), so the gateway never answers
-- a duplicate (200) and every accepted request is one durable WAL append.
-- Responses other than 202 are counted per status; done() prints one
-- machine-readable BENCH line for the script.

local threads = {}
local next_id = 1

function setup(thread)
   thread:set("tid", next_id)
   next_id = next_id + 1
   table.insert(threads, thread)
end

function init(args)
   run = args[1] or tostring(os.time())
   devices = tonumber(args[2] or "50")
   pace_ms = tonumber(args[3] or "0")
   n = 0
   ok202 = 0
   dup200 = 0
   other = 0
   sample = ""
   base_ts = os.time() * 1000
   headers = { ["Content-Type"] = "application/json" }
end

function delay()
   return pace_ms
end

function request()
   n = n + 1
   local dev = string.format("sensor-%03d", (n * 7 + tid) % devices)
   local body = string.format(
      '{"msg_id":"%s-%d-%d","ts":%d,"metrics":{"t":%.1f,"rh":%d},"tags":{"fw":"1.4.2"}}',
      run, tid, n, base_ts + n, 15 + (n % 200) / 10, 30 + n % 50)
   return wrk.format("POST", "/ingest/" .. dev, headers, body)
end

function response(status, hdrs, body)
   if status == 202 then
      ok202 = ok202 + 1
   elseif status == 200 then
      dup200 = dup200 + 1
   else
      other = other + 1
      if sample == "" then
         sample = status .. " " .. string.sub(body or "", 1, 200)
      end
   end
end

function done(summary, latency, requests)
   local a, d, o, s = 0, 0, 0, ""
   for _, t in ipairs(threads) do
      a = a + (t:get("ok202") or 0)
      d = d + (t:get("dup200") or 0)
      o = o + (t:get("other") or 0)
      local ts = t:get("sample") or ""
      if s == "" then s = ts end
   end
   local e = summary.errors
   io.write(string.format(
      "BENCH requests=%d duration_us=%d rps=%.1f status_202=%d status_200=%d status_other=%d " ..
      "err_connect=%d err_read=%d err_write=%d err_timeout=%d " ..
      "lat_mean_us=%.0f lat_p50_us=%d lat_p90_us=%d lat_p99_us=%d lat_p999_us=%d lat_max_us=%d\n",
      summary.requests, summary.duration, summary.requests / (summary.duration / 1e6), a, d, o,
      e.connect, e.read, e.write, e.timeout,
      latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9), latency.max))
   if s ~= "" then
      io.write("BENCH_SAMPLE_NON202 " .. s .. "\n")
   end
end

-- wrk script of bench/sql_throughput.py: one POST, the same for every request, over keep-alive.
-- Body and headers come from the environment: WRK_BODY (the JSON body), WRK_HEADERS (lines of
-- "Name: value", separated by newlines). At the end it prints one line
--   WRKJSON {"requests": N, "seconds": S, "p50_us": ..., "p99_us": ..., "errors": ...}
-- which the benchmark reads (wrk's own summary goes to stdout before it).

wrk.method = "POST"
wrk.body = os.getenv("WRK_BODY") or ""
wrk.headers["Content-Type"] = "application/json"
for line in string.gmatch(os.getenv("WRK_HEADERS") or "", "[^\n]+") do
  local name, value = string.match(line, "^([^:]+):%s*(.*)$")
  if name then
    wrk.headers[name] = value
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local errors = e.connect + e.read + e.write + e.status + e.timeout
  io.write(string.format(
    'WRKJSON {"requests": %d, "seconds": %.6f, "p50_us": %d, "p99_us": %d, "errors": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50), latency:percentile(99), errors
  ))
end

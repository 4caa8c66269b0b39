-- wrk script for bench/run.sh: one machine-readable line at the end of a run.
-- Only done() is defined, so wrk keeps its fast path (no Lua per request).
-- Latencies are in microseconds; non2xx counts answers outside 200-399.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH rps=%.1f p50_us=%d p99_us=%d requests=%d non2xx=%d connect=%d read=%d write=%d timeout=%d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(99),
    summary.requests, e.status, e.connect, e.read, e.write, e.timeout))
end

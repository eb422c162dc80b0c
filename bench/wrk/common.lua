-- Shared by the request scripts (loaded with dofile from the same directory by bench/suite.py's wrk runs).
-- Environment: BENCH_TOKEN (operator token), BENCH_DEVICES (comma-separated device ids),
-- BENCH_BASE_EPOCH (a whole second; each run gets its own, so timestamps never repeat across runs).
bench = {}
bench.devices = {}
for id in string.gmatch(os.getenv("BENCH_DEVICES") or "", "[^,]+") do
  bench.devices[#bench.devices + 1] = id
end
bench.headers = {["Content-Type"] = "application/json", ["Authorization"] = "Token " .. (os.getenv("BENCH_TOKEN") or "")}
bench.base = tonumber(os.getenv("BENCH_BASE_EPOCH") or "0")

-- wrk calls setup() once per thread in the main state: each thread's own state gets a distinct `tid`.
local threads = 0
tid = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

-- An ISO 8601 UTC timestamp `micro` microseconds after the base second.
function bench.stamp(micro)
  return os.date("!%Y-%m-%dT%H:%M:%S", bench.base + math.floor(micro / 1000000)) .. string.format(".%06dZ", micro % 1000000)
end

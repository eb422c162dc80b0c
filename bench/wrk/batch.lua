-- POST /telemetry/batch: BENCH_BATCH_SIZE new points per request for one device (the devices in turn),
-- 4 metrics, timestamps 1 us apart that no other request uses.
dofile(string.match(debug.getinfo(1, "S").source, "^@(.*/)") .. "common.lua")
local size = tonumber(os.getenv("BENCH_BATCH_SIZE") or "100")
local counter = 0
local parts = {}

request = function()
  counter = counter + 1
  local device = bench.devices[(counter * 7 + tid) % #bench.devices + 1]
  -- Each request owns 2000 us of one second: 500 requests per second of timestamps, per thread.
  local second = bench.stamp(tid * 100000000 + math.floor(counter / 500) * 1000000):sub(1, 19)
  local first = (counter % 500) * 2000
  for i = 1, size do
    parts[i] = string.format('{"timestamp":"%s.%06dZ","metric":"m%d","value":%d.25}',
      second, first + i, i % 4, i)
  end
  for i = size + 1, #parts do parts[i] = nil end
  local body = '{"device_id":"' .. device .. '","points":[' .. table.concat(parts, ",") .. ']}'
  return wrk.format("POST", "/telemetry/batch", bench.headers, body)
end

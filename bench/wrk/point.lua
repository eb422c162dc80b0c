-- POST /telemetry/point: one new point per request, the devices in turn, a timestamp no other request uses
-- (thread id and a per-thread counter; threads are 100 s of timestamps apart).
dofile(string.match(debug.getinfo(1, "S").source, "^@(.*/)") .. "common.lua")
local path = os.getenv("BENCH_PATH") or "/telemetry/point"
local counter = 0

request = function()
  counter = counter + 1
  local device = bench.devices[(counter * 7 + tid) % #bench.devices + 1]
  local body = string.format('{"device_id":"%s","timestamp":"%s","metric":"temperature","value":%d.5}',
    device, bench.stamp(tid * 100000000 + counter), counter % 50)
  return wrk.format("POST", path, bench.headers, body)
end

-- POST /devices: every other request registers one shared serial number (BENCH_TAG makes it new for
-- each run), the others a fresh serial each (201 for the first of the shared ones and every fresh one,
-- 200 for the repeats).
dofile(string.match(debug.getinfo(1, "S").source, "^@(.*/)") .. "common.lua")
local tag = os.getenv("BENCH_TAG") or "x"
local counter = 0

request = function()
  counter = counter + 1
  local serial
  if counter % 2 == 0 then
    serial = "SN-SHARED-" .. tag
  else
    serial = string.format("SN-%s-%d-%d", tag, tid, counter)
  end
  local body = string.format('{"serial_number":"%s","device_type":"sensor","firmware_version":"1.0.0"}', serial)
  return wrk.format("POST", "/devices", bench.headers, body)
end

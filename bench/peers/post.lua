-- wrk script: POSTs one body file to the URL given on the wrk command line.
--   BODY  path of the body file (required)
--   CTYPE Content-Type header (default image/jpeg)
--   HLEN  optional Inference-Header-Content-Length (OIP v2 binary extension bodies)
-- Counts non-2xx answers and prints them in done() (wrk only counts >= 400 as errors).
local path = os.getenv("BODY") or error("set BODY to the request body file")
local f = assert(io.open(path, "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("CTYPE") or "image/jpeg"
local hlen = os.getenv("HLEN")
if hlen and hlen ~= "" then
  wrk.headers["Inference-Header-Content-Length"] = hlen
end

local bad = 0
function response(status, headers, body)
  if status < 200 or status > 299 then bad = bad + 1 end
end

function done(summary, latency, requests)
  io.write(string.format("non-2xx responses (last thread): %d\n", bad))
end

-- wrk script for benches/flash_sale.sh: every request is a new buyer ordering one
-- key of product "flash"; counts 201s apart from every other answer. With
-- ORDER_QUERY_PASSWORD set, every order carries it as its query password (kami
-- only: what buyer order lookup costs an order).
local threads = {}
local password = os.getenv("ORDER_QUERY_PASSWORD")
local extra = password and string.format(',"query_password":"%s"', password) or ""


function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  n = 0
  created = 0
  other = 0
end

function request()
  n = n + 1
  local body = string.format('{"product_id":"flash","quantity":1,"buyer":"w%d-%d"%s}', id, n, extra)
  return wrk.format("POST", "/api/v1/orders", {["Content-Type"] = "application/json"}, body)
end

function response(status, headers, body)
  if status == 201 then created = created + 1 else other = other + 1 end
end

function done(summary, latency, requests)
  local c, o = 0, 0
  for _, t in ipairs(threads) do
    c = c + t:get("created")
    o = o + t:get("other")
  end
  io.write(string.format("answers: created %d other %d\n", c, o))
end

-- wrk -s script: POST /v1/messages as $TOKEN to conversation $CONV, each request with its own
-- clientMessageId (docs/performance.md), so none is an idempotent repeat of another.
local created = 0

function setup(thread)
  created = created + 1
  thread:set("id", created)
end

local counter = 0
local run = tostring(os.time())

request = function()
  counter = counter + 1
  local body = string.format(
    '{"conversationId":"%s","content":"hello from wrk","contentType":"text","clientMessageId":"wrk-%s-%s-%d"}',
    os.getenv("CONV"), run, tostring(id), counter)
  return wrk.format("POST", "/v1/messages", {
    ["Authorization"] = "Bearer " .. os.getenv("TOKEN"),
    ["Content-Type"] = "application/json",
  }, body)
end

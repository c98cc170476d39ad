-- Argo CD health of a Flowlens NetworkObservation, from its Ready condition.
-- Healthy: observing (also when no pod matches yet: nothing is wrong, and a
-- sync wave must not wait for pods that a later wave creates).
-- Progressing: the operator has not yet written status for this generation,
-- or some selected nodes do not run the observation yet.
-- Degraded: the spec is invalid (the message names the field).
local hs = {status = "Progressing", message = "Waiting for the Flowlens operator to write status"}
local status = obj.status
if status == nil or status.conditions == nil then
  return hs
end
local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.message = "Waiting for the Flowlens operator to observe generation " .. generation
  return hs
end
local ready = nil
for _, c in ipairs(status.conditions) do
  if c.type == "Ready" then
    ready = c
  end
end
if ready == nil then
  return hs
end
hs.message = ready.message or ""
if ready.status == "True" or ready.reason == "NoPodsSelected" then
  hs.status = "Healthy"
elseif ready.reason == "Deploying" then
  hs.status = "Progressing"
else
  hs.status = "Degraded"
end
return hs

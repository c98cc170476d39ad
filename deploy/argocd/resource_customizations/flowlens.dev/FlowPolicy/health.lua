-- Argo CD health of a Flowlens FlowPolicy, from its Ready, Enforced and
-- Degraded conditions.
-- Healthy: the revision is in force on every targeted node (also when no
-- pod matches yet: there is nothing to enforce, and a sync wave must not
-- wait for pods that a later wave creates).
-- Progressing: the operator has not yet written status for this generation,
-- or some targeted nodes do not enforce the revision yet.
-- Degraded: the spec is invalid (the previous valid revision stays in
-- force), or a node cannot enforce it (host-network pods, a node's problem).
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
local ready, enforced, degraded = nil, nil, nil
for _, c in ipairs(status.conditions) do
  if c.type == "Ready" then
    ready = c
  elseif c.type == "Enforced" then
    enforced = c
  elseif c.type == "Degraded" then
    degraded = c
  end
end
if ready ~= nil and ready.status == "False" then
  hs.status = "Degraded"
  hs.message = ready.message or ""
  return hs
end
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = degraded.message or ""
  return hs
end
if enforced == nil then
  return hs
end
hs.message = enforced.message or ""
if enforced.status == "True" or enforced.reason == "NoTargets" then
  hs.status = "Healthy"
elseif enforced.reason == "Pending" then
  hs.status = "Progressing"
else
  hs.status = "Degraded"
end
return hs

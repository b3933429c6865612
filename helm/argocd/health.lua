-- Argo CD health check for AgentSchedule (nocturne.dev/v1alpha1).
-- Install as argocd-cm key `resource.customizations.health.nocturne.dev_AgentSchedule`
-- (docs/helm.md). Conditions are the truth; `phase` is only a summary for humans.
--   Progressing: no status yet, or the operator has not observed the current generation.
--   Degraded:    the spec is invalid or over quota (Ready=False InvalidSpec/QuotaExceeded), the
--                cumulative budget is exhausted, the operator paused the schedule itself
--                (Suspended=True for any reason but SuspendedByUser, e.g. ConsecutiveFailures),
--                or no run has succeeded for two scheduled intervals (SilentStop=True).
--   Suspended:   the monthly budget is spent; the schedule resumes by itself next month.
--   Healthy:     Ready=True; a schedule paused by its owner is Healthy, with a message.
-- Argo CD runs this in gopher-lua (Lua 5.1): no goto, no integer division, no utf8 library.

local USER_REASON = "SuspendedByUser"
local hs = {}

local function find_condition(status, type_name)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type_name then
      return c
    end
  end
  return nil
end

local function describe(prefix, c)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return prefix .. ": " .. c.message
  end
  if c ~= nil and c.reason ~= nil then
    return prefix .. " (" .. c.reason .. ")"
  end
  return prefix
end

local function result(status, message)
  hs.status = status
  hs.message = message
  return hs
end

local function evaluate(o)
  local status = o.status
  if status == nil then
    return result("Progressing", "Waiting for the operator to observe this schedule")
  end
  local generation = o.metadata and o.metadata.generation
  local observed = status.observedGeneration
  if generation ~= nil and (observed == nil or observed < generation) then
    return result("Progressing",
      "Waiting for the operator to observe generation " .. tostring(generation))
  end

  local ready = find_condition(status, "Ready")
  local suspended = find_condition(status, "Suspended")
  local budget = find_condition(status, "BudgetExhausted")

  if ready ~= nil and ready.status == "False"
      and (ready.reason == "InvalidSpec" or ready.reason == "QuotaExceeded") then
    return result("Degraded", describe(ready.reason, ready))
  end
  if budget ~= nil and budget.status == "True" then
    if budget.reason == "MonthlyBudgetReached" then
      return result("Suspended", describe("Monthly budget spent", budget))
    end
    if budget.reason == "NamespaceBudgetReached" then
      return result("Suspended", describe("Namespace's monthly budget spent", budget))
    end
    return result("Degraded", describe("Budget exhausted", budget))
  end
  if suspended ~= nil and suspended.status == "True" and suspended.reason ~= USER_REASON then
    return result("Degraded", describe("Paused by the operator", suspended))
  end
  if ready == nil or ready.status ~= "True" then
    return result("Progressing", describe("Not ready yet", ready))
  end
  local silent = find_condition(status, "SilentStop")
  if silent ~= nil and silent.status == "True" then
    return result("Degraded", describe("Silent stop", silent))
  end
  if (suspended ~= nil and suspended.status == "True")
      or (o.spec ~= nil and o.spec.suspend == true) then
    return result("Healthy", describe("Suspended by user", suspended))
  end
  if status.nextRunLocal ~= nil and status.nextRunLocal ~= "" then
    return result("Healthy", "Active; next run " .. status.nextRunLocal)
  end
  return result("Healthy", "Active")
end

return evaluate(obj)

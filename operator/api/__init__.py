"""The AgentSchedule API: its model, conditions, timestamps and money as status shows them."""

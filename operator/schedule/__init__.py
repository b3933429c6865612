"""When a schedule runs and whether it may: CronJob cron semantics (robfig/cron, DST) and
the validation of a schedule."""

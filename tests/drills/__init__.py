"""Fault drills (issue 12): many schedules and runs on the real control plane, real runner pods
and real PostgreSQL while a driver kills and restarts what they depend on; afterwards the
invariants the product promises are checked and printed per fault kind. See docs/drills.md."""

"""The controller: kopf wiring, the memo handlers share, and reconcile as decide-then-apply."""

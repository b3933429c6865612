"""The run API: runner pods report here (start = budget grant, progress, finish), over TLS with
the operator's own CA, authenticated by a projected token bound to the pod (DESIGN.md §1)."""

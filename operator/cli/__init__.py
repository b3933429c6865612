"""The nocturne command (and kubectl-nocturne)."""

"""Nocturne's runner: executes one budgeted agent run inside a Job's pod."""

__version__ = "0.1.0"

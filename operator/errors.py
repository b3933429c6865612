"""Exceptions shared by the operator's layers."""

from __future__ import annotations


class NocturneError(Exception):
    """Base of the operator's own errors."""


class SettingsError(NocturneError):
    """The operator's cluster-wide settings are unusable; the message names file and field."""

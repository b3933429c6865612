"""Money as people read it, from Decimal, never through float."""

from __future__ import annotations

from decimal import Decimal


def usd(amount: Decimal) -> str:
    """At least two decimals, at most six (the precision of the history's NUMERIC columns)."""
    text = f"{amount.quantize(Decimal('0.000001')):f}".rstrip("0")
    whole, _, cents = text.partition(".")
    return f"{whole}.{cents.ljust(2, '0')}"

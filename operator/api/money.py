"""Money as people read it, from Decimal, never through float."""

from __future__ import annotations

from decimal import Decimal

from agent_runner.contract import USD_QUANTUM


def usd(amount: Decimal) -> str:
    """At least two decimals, at most six (the one quantum, ``USD_QUANTUM``)."""
    text = f"{amount.quantize(USD_QUANTUM):f}".rstrip("0")
    whole, _, cents = text.partition(".")
    return f"{whole}.{cents.ljust(2, '0')}"


def plain(amount: Decimal) -> str:
    """Every digit of ``amount`` as a plain decimal, never in exponent form (``1E+2`` is
    ``100``, ``4.000E-7`` is ``0.0000004``); for caps and settings, which must not be rounded."""
    text = f"{amount:f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text

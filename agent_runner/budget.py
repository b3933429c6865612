"""The per-run budget: a hard guarantee that recorded cost never exceeds the limit.

Before every model call the ledger reserves the worst case — an upper bound of the input's cost
plus ``max_tokens`` times the output price — with ``max_tokens`` sized from what remains, and
refuses the call when fewer than ``min_output_tokens`` would fit. After the call it settles at the
provider's reported usage (never more than the reservation from a well-behaved provider). So
``spent_before + spent + reserved <= limit`` holds after every step.

Money is ``Decimal`` quantized to the contract's one quantum (``USD_QUANTUM``, a micro-dollar:
the CRD's, the wire's and the database's), rounded up (``ROUND_CEILING``) whenever a cost is
recorded or reserved: rounding can only overstate spend, never understate it. (Grants round the
other way, down: ``grant_usd``.)

The input bound (``input_token_bound``): byte-level BPE tokenizers (OpenAI, Anthropic, Llama 3 and
most open models) never emit more tokens for a text than it has UTF-8 bytes, and the JSON request
carries every text the model reads with at least as many bytes (escaping only adds). Per-message
and per-request overheads cover special tokens and what the provider injects, e.g. Anthropic's
tool-use system prompt (at most 530 tokens on any Claude model per Anthropic's docs). The bound is
loose (about 4x for English) — which only makes the last call of a tight budget be refused
earlier; the settled cost is the real one.
"""

from __future__ import annotations

import decimal
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

from agent_runner.config import BudgetSpec
from agent_runner.contract import USD_QUANTUM, ModelPrice, usd_text
from agent_runner.exitcodes import BUDGET_EXHAUSTED, RunnerError

QUANTUM = USD_QUANTUM  # the one money quantum: the wire's, the database's, status's
ZERO = Decimal(0)
MIN_OUTPUT_TOKENS = 64  # below this a response cannot carry a useful answer or tool call
MAX_OUTPUT_TOKENS_PER_CALL = 8192  # one response never needs more; keeps requests short
PER_MESSAGE_OVERHEAD_TOKENS = 16
REQUEST_OVERHEAD_TOKENS = 1024


class BudgetExhaustedError(RunnerError):
    """No further model call fits in the run's budget (or a provider over-reported usage)."""

    exit_code = BUDGET_EXHAUSTED


def ceil_usd(amount: Decimal) -> Decimal:
    """``amount`` rounded up to the ledger's quantum."""
    return amount.quantize(QUANTUM, rounding=ROUND_CEILING)


def input_token_bound(payload: bytes, *, messages: int, extra_tokens: int = 0) -> int:
    """An upper bound of the input tokens a provider bills for a request whose serialized JSON
    body is ``payload`` with ``messages`` messages (see the module docstring for why)."""
    return (
        len(payload)
        + PER_MESSAGE_OVERHEAD_TOKENS * max(messages, 0)
        + REQUEST_OVERHEAD_TOKENS
        + max(extra_tokens, 0)
    )


def cost_of(price: ModelPrice, input_tokens: int, output_tokens: int) -> Decimal:
    """What ``input_tokens`` and ``output_tokens`` cost, rounded up to the quantum."""
    return ceil_usd(
        price.input_usd_per_token * input_tokens + price.output_usd_per_token * output_tokens
    )


def per_run_limit(
    budget: BudgetSpec,
    *,
    spent_by_other_jobs: Decimal = ZERO,
    spent_this_month_by_other_jobs: Decimal = ZERO,
) -> Decimal:
    """The limit for this run: ``maxPerRunUSD``, lowered to what remains of ``maxTotalUSD`` after
    ``spent_by_other_jobs`` and of ``maxMonthlyUSD`` after ``spent_this_month_by_other_jobs``
    (the schedule's other Jobs; earlier attempts of this Job are the ledger's ``spent_before``)."""
    limit = budget.max_per_run_usd
    if budget.max_total_usd is not None:
        limit = min(limit, max(ZERO, budget.max_total_usd - spent_by_other_jobs))
    if budget.max_monthly_usd is not None:
        limit = min(limit, max(ZERO, budget.max_monthly_usd - spent_this_month_by_other_jobs))
    return limit


@dataclass(frozen=True)
class Reservation:
    """The worst case of one model call, held until it is settled or released."""

    input_tokens: int  # upper bound of the call's input tokens
    max_tokens: int  # the call's output limit, as sent to the provider
    amount: Decimal


@dataclass(frozen=True)
class Settlement:
    """A settled call: what was recorded for it."""

    cost: Decimal
    input_tokens: int
    output_tokens: int
    usage_known: bool  # False: usage missing or malformed, the reservation was charged
    overrun: bool  # True: the provider reported more than was reserved; run must stop


class Budget:
    """The ledger of one run attempt. Not thread-safe; one call at a time."""

    def __init__(
        self,
        limit: Decimal,
        price: ModelPrice,
        *,
        spent_before: Decimal = ZERO,
        min_output_tokens: int = MIN_OUTPUT_TOKENS,
        max_output_tokens_per_call: int = MAX_OUTPUT_TOKENS_PER_CALL,
    ) -> None:
        if limit < 0 or spent_before < 0:
            raise ValueError("limit and spent_before must not be negative")
        self.limit = limit
        self.price = price
        self.spent_before = spent_before
        self.spent = ZERO
        self.reserved = ZERO
        self.input_tokens = 0
        self.output_tokens = 0
        self.max_tokens_cap = max(1, min(price.max_output_tokens, max_output_tokens_per_call))
        self.min_output_tokens = max(1, min(min_output_tokens, self.max_tokens_cap))

    @property
    def remaining(self) -> Decimal:
        """What can still be reserved (never negative)."""
        return max(ZERO, self.limit - self.spent_before - self.spent - self.reserved)

    @property
    def committed(self) -> Decimal:
        """This attempt's worst case so far: spent plus any in-flight reservation. Record this when
        the run is interrupted mid-call (SIGTERM): the provider may bill the lost call."""
        return self.spent + self.reserved

    @property
    def total_spent(self) -> Decimal:
        """Recorded cost of this Job so far: earlier attempts plus this one."""
        return self.spent_before + self.spent

    def max_output_tokens(self, input_tokens_bound: int) -> int:
        """How many output tokens the remaining budget pays for after the input's bound (may be
        below ``min_output_tokens``; 0 when not even the input fits)."""
        available = self.remaining - ceil_usd(self.price.input_usd_per_token * input_tokens_bound)
        if available < 0:
            return 0
        per_token = self.price.output_usd_per_token
        if per_token == 0:
            return self.max_tokens_cap
        with decimal.localcontext() as ctx:
            ctx.prec = 60
            tokens = int((available / per_token).to_integral_value(rounding=ROUND_FLOOR))
        tokens = min(tokens, self.max_tokens_cap)
        # Defensive: the quantized reservation must fit even if division rounded up.
        while tokens > 0 and ceil_usd(per_token * tokens) > available:
            tokens -= 1
        return tokens

    def reserve(self, input_tokens_bound: int) -> Reservation:
        """Reserve the worst case of the next call; BudgetExhaustedError if no useful call fits."""
        if input_tokens_bound < 0:
            raise ValueError("input_tokens_bound must not be negative")
        max_tokens = self.max_output_tokens(input_tokens_bound)
        if max_tokens < self.min_output_tokens:
            raise BudgetExhaustedError(
                f"budget: {usd_text(self.remaining)} USD of maxPerRunUSD {usd_text(self.limit)} "
                f"remains (earlier attempts {usd_text(self.spent_before)}, this attempt "
                f"{usd_text(self.spent)}); the next "
                f"call needs its input bound of {input_tokens_bound} tokens plus at least "
                f"{self.min_output_tokens} output tokens at {self.price.model}'s prices"
            )
        amount = ceil_usd(self.price.input_usd_per_token * input_tokens_bound) + ceil_usd(
            self.price.output_usd_per_token * max_tokens
        )
        if amount > self.remaining:  # pragma: no cover - guaranteed by max_output_tokens
            raise AssertionError("reservation exceeds the remaining budget")
        self.reserved += amount
        return Reservation(input_tokens=input_tokens_bound, max_tokens=max_tokens, amount=amount)

    def release(self, reservation: Reservation) -> None:
        """Give a reservation back: the call certainly was not billed (e.g. HTTP 429)."""
        self.reserved -= reservation.amount

    def settle(
        self, reservation: Reservation, *, input_tokens: int | None, output_tokens: int | None
    ) -> Settlement:
        """Record a call at its reported usage; with usage unknown (``None``), at the reservation.
        Usage beyond the reservation is recorded as reported and flagged ``overrun``."""
        self.reserved -= reservation.amount
        known = (
            input_tokens is not None
            and output_tokens is not None
            and input_tokens >= 0
            and output_tokens >= 0
        )
        if input_tokens is None or output_tokens is None or not known:
            settlement = Settlement(
                cost=reservation.amount,
                input_tokens=reservation.input_tokens,
                output_tokens=reservation.max_tokens,
                usage_known=False,
                overrun=False,
            )
        else:
            cost = cost_of(self.price, input_tokens, output_tokens)
            overrun = (
                input_tokens > reservation.input_tokens
                or output_tokens > reservation.max_tokens
                or cost > reservation.amount
            )
            settlement = Settlement(
                cost=cost,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                usage_known=True,
                overrun=overrun,
            )
        self.spent += settlement.cost
        self.input_tokens += settlement.input_tokens
        self.output_tokens += settlement.output_tokens
        return settlement

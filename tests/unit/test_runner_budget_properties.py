"""Property tests of the budget guarantee: over prices, limits, earlier attempts' spend and model
responses, the recorded cost never exceeds the limit — for the ledger alone and end to end through
``run_agent`` with a scripted in-process model. A provider that reports more than it was allowed
stops the run, and its overshoot is recorded as it happened.

Deterministic: every test runs under ``PROFILE`` (derandomized, no example database).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

from hypothesis import event, given, settings
from hypothesis import strategies as st

from agent_runner.agent import RunResult, run_agent
from agent_runner.budget import (
    Budget,
    BudgetExhaustedError,
    Reservation,
    ceil_usd,
    cost_of,
    input_token_bound,
    per_run_limit,
)
from agent_runner.config import TaskDocument, parse_task
from agent_runner.contract import ModelPrice, RunOutcome
from agent_runner.exitcodes import BUDGET_EXHAUSTED
from agent_runner.providers import (
    Completion,
    Message,
    OutcomeUnknownError,
    ProviderUnavailableError,
    ToolCall,
    ToolSpec,
    Usage,
)
from agent_runner.providers.client import encode
from agent_runner.tools import build_tools

PROFILE = settings(max_examples=200, derandomize=True, database=None, deadline=None)
PERMILLE = 1000
ZERO = Decimal(0)

# --- strategies -------------------------------------------------------------------------------

# USD per million tokens as the price table allows them: up to 6 integer and 6 decimal digits.
REAL_PER_MTOK = [Decimal(v) for v in ("0.15", "0.60", "2.50", "3", "10", "15", "75")]
per_mtok = st.one_of(
    st.just(ZERO),
    st.sampled_from(REAL_PER_MTOK),
    st.decimals(min_value=0, max_value=Decimal("0.001"), places=6),
    st.decimals(min_value=0, max_value=Decimal("999999.999999"), places=6),
)
max_output = st.one_of(
    st.sampled_from([1, 63, 64, 65, 4096, 8192, 16384]), st.integers(1, 10_000_000)
)
# Keyword names are the wire aliases: hypothesis reads pydantic's signature, which uses them.
prices = st.builds(
    ModelPrice,
    provider=st.just("openai"),
    model=st.just("model"),
    inputUSDPerMTok=per_mtok,
    outputUSDPerMTok=per_mtok,
    maxOutputTokens=max_output,
)
real_prices = st.builds(
    ModelPrice,
    provider=st.just("openai"),
    model=st.just("model"),
    inputUSDPerMTok=st.sampled_from(REAL_PER_MTOK),
    outputUSDPerMTok=st.sampled_from(REAL_PER_MTOK),
    maxOutputTokens=st.sampled_from([4096, 8192, 16384]),
)

# maxPerRunUSD as the contract (and the CRD) allows it: up to 6 integer and 6 decimal digits.
limits = st.one_of(
    st.just(ZERO),
    st.just(Decimal("0.000001")),  # one quantum
    st.decimals(min_value=0, max_value=Decimal(10), places=6),
    st.decimals(min_value=0, max_value=Decimal("999999.99"), places=2),
)
# What schedules really set: cents to a few dollars.
usual_limits = st.integers(1, 1_000).map(lambda cents: Decimal(cents) / 100)
input_bounds = st.one_of(
    st.integers(0, 2_000), st.integers(1_024, 200_000), st.integers(0, 10_000_000)
)
permille = st.integers(0, PERMILLE)


def spent_before(limit: Decimal) -> st.SearchStrategy[Decimal]:
    """What earlier attempts of the Job spent: nothing, all of ``limit``, or anything between."""
    return st.one_of(
        st.just(ZERO), st.just(limit), st.decimals(min_value=0, max_value=limit, places=12)
    )


Outcome = Literal["usage", "full", "missing", "malformed", "billed_failure", "not_billed"]


@dataclass(frozen=True)
class LedgerCall:
    """One model call as the ledger sees it: the input's bound and what came back. ``usage``
    reports ``input_permille``/``output_permille`` of the reservation (well-behaved); ``full``
    all of it; ``missing``/``malformed`` no usable usage; ``billed_failure`` an error that may
    have been billed; ``not_billed`` an error that certainly was not (released)."""

    input_bound: int
    outcome: Outcome
    input_permille: int
    output_permille: int


ledger_calls = st.lists(
    st.builds(
        LedgerCall,
        input_bound=input_bounds,
        outcome=st.sampled_from(
            ["usage", "usage", "full", "missing", "malformed", "billed_failure", "not_billed"]
        ),
        input_permille=permille,
        output_permille=permille,
    ),
    max_size=10,
)


@dataclass(frozen=True)
class LedgerCase:
    price: ModelPrice
    limit: Decimal
    spent_before: Decimal
    calls: list[LedgerCall]


@st.composite
def ledger_cases(draw: st.DrawFn) -> LedgerCase:
    limit = draw(limits)
    return LedgerCase(draw(prices), limit, draw(spent_before(limit)), draw(ledger_calls))


# --- ledger helpers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    spent: Decimal
    reserved: Decimal
    input_tokens: int
    output_tokens: int
    remaining: Decimal
    total_spent: Decimal


def snapshot(budget: Budget) -> Snapshot:
    return Snapshot(
        budget.spent,
        budget.reserved,
        budget.input_tokens,
        budget.output_tokens,
        budget.remaining,
        budget.total_spent,
    )


def worst_case(price: ModelPrice, input_bound: int, max_tokens: int) -> Decimal:
    """What the ledger reserves for a call (the formula of the budget module's docstring)."""
    return ceil_usd(price.input_usd_per_token * input_bound) + ceil_usd(
        price.output_usd_per_token * max_tokens
    )


def settle_as(budget: Budget, reservation: Reservation, call: LedgerCall) -> Decimal:
    """Settle (or release) ``reservation`` as ``call`` says; the cost the ledger must record."""
    if call.outcome == "not_billed":
        budget.release(reservation)
        return ZERO
    if call.outcome in ("missing", "billed_failure", "malformed"):
        bad = -1 if call.outcome == "malformed" else None
        settlement = budget.settle(reservation, input_tokens=bad, output_tokens=bad)
        assert not settlement.usage_known
        assert not settlement.overrun
        return reservation.amount
    if call.outcome == "full":
        used_in, used_out = reservation.input_tokens, reservation.max_tokens
    else:
        used_in = reservation.input_tokens * call.input_permille // PERMILLE
        used_out = reservation.max_tokens * call.output_permille // PERMILLE
    settlement = budget.settle(reservation, input_tokens=used_in, output_tokens=used_out)
    assert settlement.usage_known
    assert not settlement.overrun
    assert settlement.cost <= reservation.amount
    return cost_of(budget.price, used_in, used_out)


# --- the ledger -------------------------------------------------------------------------------


@PROFILE
@given(ledger_cases())
def test_recorded_cost_never_exceeds_the_limit_and_settling_only_adds(case: LedgerCase) -> None:
    budget = Budget(case.limit, case.price, spent_before=case.spent_before)
    for call in case.calls:
        try:
            reservation = budget.reserve(call.input_bound)
        except BudgetExhaustedError:
            continue
        assert budget.spent_before + budget.spent + budget.reserved <= case.limit
        before = snapshot(budget)
        expected = settle_as(budget, reservation, call)
        after = snapshot(budget)
        assert after.spent == before.spent + expected
        assert after.reserved == 0
        assert after.total_spent <= case.limit
        # Monotonic: spend and tokens only grow; what was reserved and not spent comes back.
        assert after.total_spent >= before.total_spent
        assert after.input_tokens >= before.input_tokens
        assert after.output_tokens >= before.output_tokens
        assert after.remaining == before.remaining + reservation.amount - expected
    assert budget.total_spent <= case.limit
    assert budget.committed == budget.spent


@PROFILE
@given(ledger_cases())
def test_reservations_fit_what_remains_and_a_refused_call_changes_nothing(
    case: LedgerCase,
) -> None:
    budget = Budget(case.limit, case.price, spent_before=case.spent_before)
    for call in case.calls:
        before = snapshot(budget)
        smallest = worst_case(case.price, call.input_bound, budget.min_output_tokens)
        try:
            reservation = budget.reserve(call.input_bound)
        except BudgetExhaustedError:
            assert snapshot(budget) == before
            # Refused only when not even the smallest useful call fits.
            assert smallest > before.remaining
            event("refused")
            continue
        event("reserved" if budget.remaining else "reserved all that remained")
        assert reservation.amount <= before.remaining
        assert reservation.amount == worst_case(
            case.price, call.input_bound, reservation.max_tokens
        )
        assert reservation.input_tokens == call.input_bound
        assert budget.min_output_tokens <= reservation.max_tokens <= budget.max_tokens_cap
        assert reservation.max_tokens <= case.price.max_output_tokens
        assert budget.remaining == before.remaining - reservation.amount
        assert (budget.spent, budget.input_tokens) == (before.spent, before.input_tokens)
        settle_as(budget, reservation, call)


@PROFILE
@given(
    price=prices,
    spent=st.decimals(min_value=0, max_value=Decimal(1000), places=12),
    input_bound=input_bounds,
    extra_output=st.integers(0, 20_000),
)
def test_a_call_that_fits_exactly_is_made_and_stays_within_the_limit(
    price: ModelPrice, spent: Decimal, input_bound: int, extra_output: int
) -> None:
    """The limit is exactly the worst case of a call with ``n`` >= the minimum output tokens."""
    probe = Budget(ZERO, price)
    n = min(probe.min_output_tokens + extra_output, probe.max_tokens_cap)
    limit = spent + worst_case(price, input_bound, n)
    budget = Budget(limit, price, spent_before=spent)
    reservation = budget.reserve(input_bound)
    assert reservation.max_tokens >= n
    assert budget.remaining >= 0
    budget.settle(
        reservation, input_tokens=reservation.input_tokens, output_tokens=reservation.max_tokens
    )
    assert budget.total_spent <= limit
    if price.output_usd_per_token * n == ceil_usd(price.output_usd_per_token * n) and (
        reservation.max_tokens == n
    ):
        assert budget.total_spent == limit  # reached exactly, not a quantum more


@PROFILE
@given(price=prices, limit=limits, over=st.decimals(min_value=0, max_value=10, places=12))
def test_nothing_remains_after_earlier_attempts_spent_the_limit(
    price: ModelPrice, limit: Decimal, over: Decimal
) -> None:
    """``spent_before`` at or over the limit (a lowered maxTotalUSD): no call can add cost."""
    budget = Budget(limit, price, spent_before=limit + over)
    assert budget.remaining == 0
    try:
        reservation = budget.reserve(0)
    except BudgetExhaustedError:
        return
    assert reservation.amount == 0  # only a free model still gets a call
    budget.settle(reservation, input_tokens=0, output_tokens=reservation.max_tokens)
    assert budget.spent == 0


# --- end to end: run_agent with a scripted model ----------------------------------------------

TurnKind = Literal["continue", "finish", "text", "empty", "unknown", "unavailable"]


@dataclass(frozen=True)
class Turn:
    """One scripted model response. ``continue``: an invalid finish call plus ``pad`` characters
    of text (the run goes on, the conversation grows); ``finish``/``text``: a final answer;
    ``empty``: an empty answer; ``unknown``: no response (maybe billed); ``unavailable``: retries
    ran out (not billed). ``usage`` is ``None`` (not reported) or permille of the call's input
    bound and max_tokens; a nonzero ``overrun`` reports that many tokens beyond the bound
    (input) or max_tokens (output) instead."""

    kind: TurnKind
    pad: int = 0
    usage: tuple[int, int] | None = (PERMILLE, PERMILLE)
    overrun: tuple[int, int] = (0, 0)


@dataclass
class ScriptedModel:
    """An in-process model behind the provider interface that bills like a real one: it knows
    what the ledger must record for each call (``billed``: cost, input and output tokens)."""

    price: ModelPrice
    script: Sequence[Turn]
    calls: int = 0
    billed: list[tuple[Decimal, int, int]] = field(default_factory=list)
    name: str = "scripted"

    def input_token_bound(self, messages: Sequence[Message], tools: Sequence[ToolSpec]) -> int:
        body = encode(
            {
                "messages": [
                    [m.role, m.text, [c.arguments_json() for c in m.tool_calls]] for m in messages
                ],
                "tools": [[t.name, t.description, dict(t.parameters)] for t in tools],
            }
        )
        return input_token_bound(body, messages=len(messages))

    def complete(
        self,
        messages: Sequence[Message],
        tools: Sequence[ToolSpec],
        *,
        max_tokens: int,
        deadline: float,
    ) -> Completion:
        bound = self.input_token_bound(messages, tools)
        reserved = worst_case(self.price, bound, max_tokens)
        turn = self.script[self.calls] if self.calls < len(self.script) else Turn("continue")
        self.calls += 1
        if turn.kind == "unavailable":
            raise ProviderUnavailableError("scripted: retries ran out")
        if turn.kind == "unknown":
            self.billed.append((reserved, bound, max_tokens))
            raise OutcomeUnknownError("scripted: the connection dropped")
        usage = None
        if turn.usage is None:
            self.billed.append((reserved, bound, max_tokens))
        else:
            used_in = bound * turn.usage[0] // PERMILLE
            used_out = max_tokens * turn.usage[1] // PERMILLE
            if turn.overrun[0]:
                used_in = bound + turn.overrun[0]
            if turn.overrun[1]:
                used_out = max_tokens + turn.overrun[1]
            usage = Usage(used_in, used_out)
            self.billed.append((cost_of(self.price, used_in, used_out), used_in, used_out))
        calls: tuple[ToolCall, ...] = ()
        text = ""
        if turn.kind == "continue":
            text = "x" * turn.pad
            calls = (ToolCall(id=f"c{self.calls}", name="finish", arguments={}),)
        elif turn.kind == "finish":
            calls = (ToolCall(id="f", name="finish", arguments={"output": "done"}),)
        elif turn.kind == "text":
            text = "The answer."
        return Completion(text=text, tool_calls=calls, usage=usage, stop_reason="end_turn")

    def close(self) -> None:
        """Nothing to release."""


def task_document(max_per_run: Decimal, max_total: Decimal | None, max_steps: int) -> TaskDocument:
    budget = {"maxPerRunUSD": f"{max_per_run:f}"}
    if max_total is not None:
        budget["maxTotalUSD"] = f"{max_total:f}"
    return parse_task(
        {
            "version": 1,
            "schedule": {"namespace": "research", "name": "prices", "uid": "uid-1"},
            "task": {"query": "Report price changes since the previous run."},
            "agent": {"model": "model", "provider": "openai", "maxSteps": max_steps},
            "budget": budget,
            "timeoutSeconds": 600,
        }
    )


def turns(*, usage: st.SearchStrategy[tuple[int, int] | None]) -> st.SearchStrategy[Turn]:
    return st.builds(
        Turn,
        kind=st.sampled_from(
            ["continue"] * 6 + ["finish", "text", "empty", "unknown", "unavailable"]
        ),
        pad=st.one_of(st.just(0), st.integers(0, 4_000)),
        usage=usage,
    )


well_behaved_usage = st.one_of(
    st.none(), st.just((PERMILLE, PERMILLE)), st.tuples(permille, permille)
)


@dataclass(frozen=True)
class RunCase:
    price: ModelPrice
    doc: TaskDocument
    spent_before: Decimal
    spent_elsewhere: Decimal
    script: list[Turn]


def any_limit(price: ModelPrice) -> st.SearchStrategy[Decimal]:
    """A few calls' worth at ``price`` (the budget runs out mid-run), a usual or any limit."""
    return st.one_of(a_few_calls(price), usual_limits, limits)


def a_few_calls(price: ModelPrice) -> st.SearchStrategy[Decimal]:
    """Half a call's to ten calls' worst case at ``price`` (a call of 5000 input tokens)."""
    call = worst_case(price, 5_000, Budget(ZERO, price).max_tokens_cap)
    return st.integers(5, 100).map(lambda tenths: ceil_usd(call * tenths / 10))


RUN_PRICES = st.one_of(real_prices, prices)
RUN_MAX_TOTALS = st.one_of(st.none(), usual_limits)
RUN_MAX_STEPS = st.sampled_from([1, 2, 3, 5, 8, 13, 20, 40])
RUN_SCRIPTS = st.lists(turns(usage=well_behaved_usage), max_size=15)


@st.composite
def run_cases(
    draw: st.DrawFn,
    *,
    price_strategy: st.SearchStrategy[ModelPrice] = RUN_PRICES,
    limit_strategy: Callable[[ModelPrice], st.SearchStrategy[Decimal]] = any_limit,
    max_total_strategy: st.SearchStrategy[Decimal | None] = RUN_MAX_TOTALS,
    max_steps: st.SearchStrategy[int] = RUN_MAX_STEPS,
    script: st.SearchStrategy[list[Turn]] = RUN_SCRIPTS,
) -> RunCase:
    """A task document (maxPerRunUSD, maybe maxTotalUSD), the model's price, what earlier
    attempts and the schedule's other Jobs spent, and the model's script."""
    price = draw(price_strategy)
    max_per_run = draw(limit_strategy(price))
    max_total = draw(max_total_strategy)
    spent_elsewhere = ZERO
    if max_total is not None:
        spent_elsewhere = draw(
            st.one_of(st.just(ZERO), st.decimals(min_value=0, max_value=max_total, places=12))
        )
    doc = task_document(max_per_run, max_total, draw(max_steps))
    limit = per_run_limit(doc.budget, spent_by_other_jobs=spent_elsewhere)
    earlier = draw(st.one_of(st.just(ZERO), st.decimals(min_value=0, max_value=limit, places=12)))
    return RunCase(price, doc, earlier, spent_elsewhere, draw(script))


def play(case: RunCase) -> tuple[ScriptedModel, Budget, RunResult, list[Decimal]]:
    model = ScriptedModel(case.price, case.script)
    budget = Budget(
        per_run_limit(case.doc.budget, spent_by_other_jobs=case.spent_elsewhere),
        case.price,
        spent_before=case.spent_before,
    )
    reported: list[Decimal] = []
    result = run_agent(
        case.doc,
        provider=model,
        budget=budget,
        tools=build_tools(case.doc.agent),
        deadline=100.0,
        on_usage=lambda cost, _in, _out: reported.append(cost),
        clock=lambda: 0.0,
        sleep=lambda seconds: None,
    )
    return model, budget, result, reported


def check_within_budget(case: RunCase) -> RunResult:
    """Play ``case`` and check the guarantee and the record; the run's result."""
    model, budget, result, reported = play(case)
    max_per_run = case.doc.budget.max_per_run_usd
    assert budget.total_spent <= max_per_run
    assert case.spent_before + result.cost <= max_per_run
    max_total = case.doc.budget.max_total_usd
    if max_total is not None:
        assert case.spent_elsewhere + budget.total_spent <= max_total
    # The record is the model's bill: nothing lost, nothing invented.
    assert result.cost == budget.spent == sum((cost for cost, _, _ in model.billed), ZERO)
    assert result.input_tokens == sum(tokens for _, tokens, _ in model.billed)
    assert result.output_tokens == sum(tokens for _, _, tokens in model.billed)
    assert result.steps == model.calls <= case.doc.agent.max_steps
    # Progress reports only ever grow, and never past the limit.
    assert reported == sorted(reported)
    assert all(case.spent_before + cost <= max_per_run for cost in reported)
    assert reported[-1:] in ([], [result.cost])
    if result.status is RunOutcome.BUDGET_EXCEEDED:
        assert result.exit_code == BUDGET_EXHAUSTED
    event(f"{result.status} after {'no' if result.steps == 0 else 'some'} model calls")
    return result


@PROFILE
@given(run_cases())
def test_a_run_never_records_more_than_max_per_run_usd(case: RunCase) -> None:
    check_within_budget(case)


# Calls that keep the run going and use much of what they reserve.
heavy_usage = st.one_of(st.none(), st.tuples(st.integers(500, PERMILLE), permille))
continuing = st.builds(Turn, kind=st.just("continue"), pad=st.integers(0, 4_000), usage=heavy_usage)


@PROFILE
@given(
    run_cases(
        limit_strategy=a_few_calls,
        max_total_strategy=st.none(),
        max_steps=st.just(40),
        script=st.lists(st.one_of(continuing, turns(usage=heavy_usage)), min_size=8, max_size=12),
    )
)
def test_a_run_that_runs_out_of_budget_stops_within_it(case: RunCase) -> None:
    check_within_budget(case)


_beyond = st.one_of(st.integers(1, 1_000), st.sampled_from([100_000, 1_000_000, 10_000_000]))
overrun = st.one_of(
    st.tuples(_beyond, st.just(0)), st.tuples(st.just(0), _beyond), st.tuples(_beyond, _beyond)
)


@st.composite
def overrun_scripts(draw: st.DrawFn) -> list[Turn]:
    """Well-behaved calls that keep the run going, then one over its reservation, then more."""
    before = draw(
        st.lists(
            st.builds(
                Turn,
                kind=st.just("continue"),
                pad=st.integers(0, 2_000),
                usage=well_behaved_usage,
            ),
            max_size=4,
        )
    )
    bad = Turn(
        draw(st.sampled_from(["continue", "finish", "text"])),
        usage=draw(st.tuples(permille, permille)),
        overrun=draw(overrun),
    )
    after = draw(st.lists(turns(usage=well_behaved_usage), max_size=3))
    return [*before, bad, *after]


@PROFILE
@given(
    run_cases(
        price_strategy=real_prices,
        limit_strategy=lambda _: st.decimals(min_value=5, max_value=Decimal(100), places=6),
        max_total_strategy=st.none(),
        max_steps=st.integers(5, 20),  # room for the calls up to the overrun
        script=overrun_scripts(),
    )
)
def test_a_provider_over_its_reservation_stops_the_run_and_is_recorded_as_reported(
    case: RunCase,
) -> None:
    model, budget, result, _ = play(case)
    at = next(i for i, turn in enumerate(case.script) if any(turn.overrun))
    assert result.steps == model.calls <= at + 1  # never a call after the overrun
    assert result.cost == budget.spent == sum((cost for cost, _, _ in model.billed), ZERO)
    assert result.input_tokens == sum(tokens for _, tokens, _ in model.billed)
    assert result.output_tokens == sum(tokens for _, _, tokens in model.billed)
    event("overrun reached" if model.calls == at + 1 else "run ended before the overrun")
    if model.calls < at + 1:  # the budget or max_steps ended the run first
        assert budget.total_spent <= case.doc.budget.max_per_run_usd
        return
    assert result.status is RunOutcome.BUDGET_EXCEEDED
    assert result.exit_code == BUDGET_EXHAUSTED
    assert result.error is not None
    assert "recorded as reported" in result.error
    assert result.output is None
    # Everything before the overrun stayed within the limit; the overrun is booked as reported,
    # even where that is past the limit.
    overrun_cost, overrun_in, overrun_out = model.billed[-1]
    assert overrun_cost == cost_of(case.price, overrun_in, overrun_out)
    assert budget.total_spent - overrun_cost <= case.doc.budget.max_per_run_usd
    if budget.total_spent > case.doc.budget.max_per_run_usd:
        event("recorded past the limit")

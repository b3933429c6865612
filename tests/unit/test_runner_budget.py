"""The budget ledger: reservations sized from what remains, settled at usage, within the limit."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest

from agent_runner.budget import (
    MIN_OUTPUT_TOKENS,
    QUANTUM,
    Budget,
    BudgetExhaustedError,
    ceil_usd,
    cost_of,
    input_token_bound,
    per_run_limit,
)
from agent_runner.config import BudgetSpec
from agent_runner.contract import USD_QUANTUM, ModelPrice
from agent_runner.exitcodes import BUDGET_EXHAUSTED


def price(
    model: str, input_per_mtok: Decimal, output_per_mtok: Decimal, max_output_tokens: int
) -> ModelPrice:
    return ModelPrice(
        provider="openai",
        model=model,
        input_usd_per_mtok=input_per_mtok,
        output_usd_per_mtok=output_per_mtok,
        max_output_tokens=max_output_tokens,
    )


MINI = price("gpt-4o-mini", Decimal("0.15"), Decimal("0.60"), 16384)
FREE = price("offline-demo", Decimal(0), Decimal(0), 4096)


def test_ceil_usd_rounds_up_to_the_quantum() -> None:
    # One quantum from the CRD to the ledger, the wire, the database and status.
    assert QUANTUM == USD_QUANTUM == Decimal("0.000001")
    assert ceil_usd(Decimal("0.00000000001")) == Decimal("0.000001")
    assert ceil_usd(Decimal("0.1234561")) == Decimal("0.123457")
    assert ceil_usd(Decimal("2")) == Decimal("2.000000")


def test_cost_of_is_exact_then_rounded_up() -> None:
    # 1000 * 0.15e-6 + 500 * 0.60e-6 = 0.00015 + 0.0003
    assert cost_of(MINI, 1000, 500) == Decimal("0.00045")
    odd = price("odd", Decimal("0.000001"), Decimal("0.000003"), 10)
    assert cost_of(odd, 1, 1) == Decimal("0.000001")  # 4e-12 rounds up, never down to 0


def test_input_token_bound_counts_bytes_and_overheads() -> None:
    assert input_token_bound(b"x" * 100, messages=2) == 100 + 2 * 16 + 1024
    assert input_token_bound("é".encode(), messages=0, extra_tokens=5) == 2 + 1024 + 5


def test_max_tokens_are_sized_from_the_remaining_budget() -> None:
    budget = Budget(Decimal("0.001"), MINI)
    # input bound 2000 tokens = 0.0003 USD; 0.0007 / 0.0000006 = 1166.66 -> 1166 tokens,
    # 0.0006996 USD; the reservation rounds up to the micro-dollar: 0.000999.6 -> 0.001
    reservation = budget.reserve(2000)
    assert reservation.max_tokens == 1166
    assert reservation.amount == Decimal("0.001000")
    assert budget.remaining == Decimal("0.001") - reservation.amount
    assert budget.remaining >= 0


def test_max_tokens_are_capped_by_model_and_per_call_limits() -> None:
    assert Budget(Decimal(100), MINI).reserve(10).max_tokens == 8192
    assert Budget(Decimal(100), MINI, max_output_tokens_per_call=50_000).reserve(10).max_tokens == (
        16384
    )
    assert Budget(Decimal(0), FREE).reserve(10**9).max_tokens == 4096


def test_call_is_refused_when_no_useful_answer_fits() -> None:
    # Input bound 1000 costs 0.00015; the rest (0.000038) pays for 63 output tokens: refused.
    limit = Decimal("0.000188")
    budget = Budget(limit, MINI)
    with pytest.raises(BudgetExhaustedError) as excinfo:
        budget.reserve(1000)
    assert excinfo.value.exit_code == BUDGET_EXHAUSTED
    assert "at least 64 output tokens" in str(excinfo.value)
    assert budget.reserved == 0
    # One micro-dollar more pays for 65 (0.000039 USD): the reservation takes it to the last one.
    exact = Budget(limit + USD_QUANTUM, MINI)
    reservation = exact.reserve(1000)
    assert reservation.max_tokens == MIN_OUTPUT_TOKENS + 1
    assert exact.remaining == 0


def test_zero_budget_refuses_paid_models_and_admits_free_ones() -> None:
    with pytest.raises(BudgetExhaustedError):
        Budget(Decimal(0), MINI).reserve(0)
    assert Budget(Decimal(0), FREE).reserve(50_000).amount == 0


def test_settle_at_usage_and_release() -> None:
    budget = Budget(Decimal(1), MINI)
    reservation = budget.reserve(5000)
    settlement = budget.settle(reservation, input_tokens=1200, output_tokens=300)
    assert settlement.cost == cost_of(MINI, 1200, 300)
    assert settlement.usage_known
    assert not settlement.overrun
    assert budget.spent == settlement.cost
    assert (budget.input_tokens, budget.output_tokens) == (1200, 300)
    assert budget.reserved == 0
    second = budget.reserve(5000)
    assert budget.committed == settlement.cost + second.amount
    budget.release(second)
    assert budget.committed == budget.spent
    assert budget.spent == settlement.cost
    assert budget.reserved == 0


def test_unknown_usage_is_charged_at_the_reservation() -> None:
    budget = Budget(Decimal(1), MINI)
    reservation = budget.reserve(5000)
    settlement = budget.settle(reservation, input_tokens=None, output_tokens=12)
    assert settlement.cost == reservation.amount
    assert not settlement.usage_known
    assert budget.input_tokens == 5000
    assert budget.output_tokens == reservation.max_tokens
    negative = budget.reserve(10)
    assert budget.settle(negative, input_tokens=-1, output_tokens=1).cost == negative.amount


def test_usage_beyond_the_reservation_is_recorded_and_flagged() -> None:
    budget = Budget(Decimal("0.01"), MINI)
    reservation = budget.reserve(1000)
    settlement = budget.settle(
        reservation, input_tokens=1000, output_tokens=reservation.max_tokens + 10_000
    )
    assert settlement.overrun
    assert settlement.cost == cost_of(MINI, 1000, reservation.max_tokens + 10_000)
    assert budget.spent == settlement.cost  # the truth is recorded, even past the limit
    with pytest.raises(BudgetExhaustedError):
        budget.reserve(0)


def test_spent_before_draws_from_the_same_budget() -> None:
    budget = Budget(Decimal("0.5"), MINI, spent_before=Decimal("0.4999"))
    assert budget.remaining == Decimal("0.0001")
    assert budget.total_spent == Decimal("0.4999")
    with pytest.raises(BudgetExhaustedError, match=r"earlier attempts 0\.4999"):
        budget.reserve(1000)
    over = Budget(Decimal("0.5"), FREE, spent_before=Decimal("0.6"))
    assert over.remaining == 0


def test_negative_inputs_are_programming_errors() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        Budget(Decimal(-1), MINI)
    with pytest.raises(ValueError, match="must not be negative"):
        Budget(Decimal(1), MINI).reserve(-1)


def test_per_run_limit_respects_the_total_cap() -> None:
    spec = BudgetSpec.model_validate({"maxPerRunUSD": "2.00", "maxTotalUSD": "10"})
    assert per_run_limit(spec) == Decimal("2.00")
    assert per_run_limit(spec, spent_by_other_jobs=Decimal("9.25")) == Decimal("0.75")
    assert per_run_limit(spec, spent_by_other_jobs=Decimal(11)) == 0
    no_total = BudgetSpec.model_validate({"maxPerRunUSD": "2.00"})
    assert per_run_limit(no_total, spent_by_other_jobs=Decimal(100)) == Decimal("2.00")


def test_per_run_limit_respects_the_monthly_cap_and_the_tighter_cap_wins() -> None:
    spec = BudgetSpec.model_validate(
        {"maxPerRunUSD": "2.00", "maxTotalUSD": "100", "maxMonthlyUSD": "5"}
    )
    assert per_run_limit(spec, spent_this_month_by_other_jobs=Decimal("4.40")) == Decimal("0.60")
    assert per_run_limit(spec, spent_this_month_by_other_jobs=Decimal(7)) == 0
    both = per_run_limit(
        spec,
        spent_by_other_jobs=Decimal("99.90"),
        spent_this_month_by_other_jobs=Decimal("1.00"),
    )
    assert both == Decimal("0.10")


def test_monthly_cap_must_be_a_decimal_string() -> None:
    with pytest.raises(ValueError, match="maxMonthlyUSD"):
        BudgetSpec.model_validate({"maxPerRunUSD": "2.00", "maxMonthlyUSD": 5.5})


def _random_price(rng: random.Random) -> ModelPrice:
    def per_mtok() -> Decimal:
        if rng.random() < 0.1:
            return Decimal(0)
        return Decimal(rng.randint(1, 100_000_000)).scaleb(-6)  # 0.000001 .. 100 USD

    return price("m", per_mtok(), per_mtok(), rng.choice([16, 64, 4096, 200_000]))


def test_property_recorded_cost_never_exceeds_the_limit() -> None:
    """Random prices, limits, earlier spend and well-behaved responses: after every step, spent
    (plus earlier attempts) stays within the limit, and every refusal was necessary."""
    rng = random.Random(20261126)  # noqa: S311 - seeded, reproducible
    refusals = settled = 0
    for _ in range(3000):
        price = _random_price(rng)
        limit = Decimal(rng.randint(0, 10_000_000)).scaleb(-6)
        before = (limit * Decimal(rng.choice(["0", "0", "0.5", "0.99", "1", "1.2"]))).quantize(
            QUANTUM
        )
        budget = Budget(limit, price, spent_before=before)
        for _ in range(rng.randint(1, 30)):
            bound = rng.choice([0, rng.randint(1, 500), rng.randint(1, 200_000)])
            remaining = budget.remaining
            try:
                reservation = budget.reserve(bound)
            except BudgetExhaustedError:
                refusals += 1
                cheapest = ceil_usd(price.input_usd_per_token * bound) + ceil_usd(
                    price.output_usd_per_token * budget.min_output_tokens
                )
                assert cheapest > remaining, "refused a call that fitted"
                continue
            assert reservation.max_tokens >= budget.min_output_tokens
            assert before + budget.spent + budget.reserved <= limit or before > limit
            outcome = rng.random()
            if outcome < 0.1:
                budget.release(reservation)
            elif outcome < 0.2:
                budget.settle(reservation, input_tokens=None, output_tokens=None)
            else:
                settlement = budget.settle(
                    reservation,
                    input_tokens=rng.randint(0, bound),
                    output_tokens=rng.randint(0, reservation.max_tokens),
                )
                assert not settlement.overrun
                assert settlement.cost <= reservation.amount
                settled += 1
            assert budget.reserved == 0
            if before <= limit:
                assert budget.total_spent <= limit
            else:
                assert budget.spent == 0
    assert refusals > 1000
    assert settled > 1000

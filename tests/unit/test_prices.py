"""The price table: shipped with the operator (each grant carries its model's price),
replaceable, exact, and never guessing."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path

import pytest

from agent_runner.contract import ModelPrice
from nocturne_operator.prices import PriceTableError, load_price_table, parse_price_table

TABLE = """
version: 1
updated: 2025-06-01
currency: USD
providers:
  openai:
    local-llama:
      inputPerMTok: "0.000001"
      outputPerMTok: "2"
      maxOutputTokens: 1000
      aliases: [llama]
"""


def test_shipped_table_prices_well_known_models() -> None:
    table = load_price_table()
    assert table.version == 1
    assert table.updated == dt.date(2025, 6, 1)
    mini = table.lookup("openai", "gpt-4o-mini")
    assert mini == ModelPrice(
        provider="openai",
        model="gpt-4o-mini",
        input_usd_per_mtok=Decimal("0.15"),
        output_usd_per_mtok=Decimal("0.60"),
        max_output_tokens=16384,
    )
    assert table.lookup("openai", "gpt-4o").output_usd_per_mtok == Decimal("10.00")
    assert table.lookup("openai", "gpt-4.1-mini").input_usd_per_mtok == Decimal("0.40")
    sonnet = table.lookup("anthropic", "claude-sonnet-4-20250514")
    assert (sonnet.input_usd_per_mtok, sonnet.output_usd_per_mtok) == (Decimal(3), Decimal(15))
    assert table.lookup("anthropic", "claude-sonnet-4-0") == sonnet  # alias
    assert table.lookup("anthropic", "claude-3-5-haiku-latest").model == (
        "claude-3-5-haiku-20241022"
    )
    offline = table.lookup("offline", "offline-demo")
    assert offline.input_usd_per_token == 0
    assert offline.output_usd_per_token == 0


def test_every_shipped_price_is_a_decimal() -> None:
    for price in load_price_table().models.values():
        assert isinstance(price.input_usd_per_mtok, Decimal)
        assert isinstance(price.output_usd_per_mtok, Decimal)
        assert price.max_output_tokens > 0


def test_per_token_prices_are_exact() -> None:
    price = load_price_table().lookup("openai", "gpt-4o-mini")
    assert price.input_usd_per_token == Decimal("0.00000015")
    assert price.output_usd_per_token * 1_000_000 == Decimal("0.60")


def test_unknown_model_is_an_error_naming_known_ones() -> None:
    table = load_price_table()
    with pytest.raises(PriceTableError) as excinfo:
        table.lookup("openai", "gpt-9")
    message = str(excinfo.value)
    assert "agent.model 'gpt-9': no price for provider 'openai'" in message
    assert "gpt-4o-mini" in message
    assert "priceTable.override" in message
    with pytest.raises(PriceTableError, match="no price for provider 'anthropic'"):
        table.lookup("anthropic", "gpt-4o-mini")  # the provider matters


def test_override_file_replaces_the_table(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(TABLE)
    table = load_price_table(path)
    assert table.lookup("openai", "llama").input_usd_per_mtok == Decimal("0.000001")
    assert table.source == str(path)
    with pytest.raises(PriceTableError):
        table.lookup("openai", "gpt-4o-mini")


def test_missing_override_file(tmp_path: Path) -> None:
    with pytest.raises(PriceTableError, match=r"price table '.*nope.yaml': cannot read"):
        load_price_table(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (TABLE.replace('"0.000001"', "0.15"), "inputPerMTok 0.15: Value error, must be a quoted"),
        (TABLE.replace('"2"', '"-2"'), 'outputPerMTok "-2": Value error'),
        (TABLE.replace('"2"', '"1e3"'), 'outputPerMTok "1e3": Value error'),
        (TABLE.replace("version: 1", "version: 2"), "version 2: Input should be 1"),
        (TABLE.replace("USD", "EUR"), "currency \"EUR\": Input should be 'USD'"),
        (TABLE.replace("openai:", "mistral:"), "providers.mistral"),
        (TABLE.replace("maxOutputTokens: 1000", "maxOutputTokens: 0"), "maxOutputTokens 0"),
        (TABLE.replace("aliases: [llama]", "aliases: [llama, local-llama]"), "listed twice"),
        (TABLE + "extra: 1\n", "extra 1: Extra inputs are not permitted"),
        ("version: [", "not valid YAML"),
    ],
)
def test_bad_tables_are_refused_precisely(text: str, expected: str) -> None:
    with pytest.raises(PriceTableError) as excinfo:
        parse_price_table(text, source="test.yaml")
    assert "price table test.yaml" in str(excinfo.value)
    assert expected in str(excinfo.value)

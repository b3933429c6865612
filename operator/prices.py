"""The versioned model price table (USD per million tokens), shipped as package data
(``operator/data/prices.yaml``) and replaceable with the setting ``price_table_file``.

The table lives only with the operator: each run's grant carries its model's price
(``agent_runner.contract.ModelPrice``), so runner pods hold no copy.

Prices are ``Decimal`` parsed from decimal strings; a YAML float is refused because it has already
lost precision. A model missing from the table is a configuration error, never a guess.
"""

from __future__ import annotations

import datetime as dt
import importlib.resources
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent_runner.contract import ModelPrice, ProviderName, describe_validation_error
from nocturne_operator.errors import NocturneError

PRICE_TABLE_VERSION = 1
_PRICE = re.compile(r"^[0-9]{1,6}(\.[0-9]{1,6})?$")


class PriceTableError(NocturneError):
    """The price table is unusable, or it has no price for a schedule's model."""


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    input_per_mtok: Decimal = Field(alias="inputPerMTok")
    output_per_mtok: Decimal = Field(alias="outputPerMTok")
    max_output_tokens: int = Field(alias="maxOutputTokens", ge=1, le=10_000_000)
    aliases: tuple[str, ...] = ()

    @field_validator("input_per_mtok", "output_per_mtok", mode="before")
    @classmethod
    def _decimal_string(cls, value: object) -> object:
        if not isinstance(value, str) or not _PRICE.fullmatch(value):
            # pydantic reports ValueError (not TypeError) as a field error.
            raise ValueError(
                'must be a quoted non-negative decimal string such as "0.15" (floats lose cents)'
            )
        return Decimal(value)


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1]
    updated: dt.date
    currency: Literal["USD"]
    providers: dict[ProviderName, dict[str, _Entry]]


@dataclass(frozen=True)
class PriceTable:
    """A loaded price table; ``lookup`` resolves a model by name or alias."""

    version: int
    updated: dt.date
    source: str
    models: dict[tuple[str, str], ModelPrice]

    def lookup(self, provider: str, model: str) -> ModelPrice:
        """The price of ``model`` served by ``provider``; PriceTableError if the table has none."""
        price = self.models.get((provider, model))
        if price is None:
            known = sorted(name for prov, name in self.models if prov == provider)
            raise PriceTableError(
                f"agent.model {model!r}: no price for provider {provider!r} in the price table "
                f"{self.source} (updated {self.updated}); known: {', '.join(known) or 'none'}. "
                "Add it to the cluster's price table (Helm value priceTable.override)"
            )
        return price


def parse_price_table(text: str, *, source: str) -> PriceTable:
    """A price table from YAML text; ``source`` names it in errors."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PriceTableError(f"price table {source}: not valid YAML: {exc}") from exc
    try:
        table = _Table.model_validate(raw)
    except ValidationError as exc:
        raise PriceTableError(
            f"price table {source}: {describe_validation_error(exc, prefix='')}"
        ) from exc
    models: dict[tuple[str, str], ModelPrice] = {}
    for provider, entries in table.providers.items():
        for name, entry in entries.items():
            for key in (name, *entry.aliases):
                if (provider, key) in models:
                    raise PriceTableError(
                        f"price table {source}: providers.{provider}.{name}: model name or "
                        f"alias {key!r} is listed twice"
                    )
                models[(provider, key)] = ModelPrice(
                    provider=provider,
                    model=name,
                    input_usd_per_mtok=entry.input_per_mtok,
                    output_usd_per_mtok=entry.output_per_mtok,
                    max_output_tokens=entry.max_output_tokens,
                )
    return PriceTable(version=table.version, updated=table.updated, source=source, models=models)


def load_price_table(path: Path | None = None) -> PriceTable:
    """The table at ``path`` (the setting ``price_table_file``), else the one shipped with the
    operator."""
    if path is None:
        resource = importlib.resources.files("nocturne_operator").joinpath("data/prices.yaml")
        try:
            text = resource.read_text(encoding="utf-8")
        except OSError as exc:
            raise PriceTableError(
                f"price table: the built-in table is missing from the package: {exc}"
            ) from exc
        return parse_price_table(text, source="built-in prices.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PriceTableError(f"price table {str(path)!r}: cannot read: {exc.strerror}") from exc
    return parse_price_table(text, source=str(path))

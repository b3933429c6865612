"""The CRD (what the apiserver enforces) and the pydantic models (what the operator and CLI
enforce) describe the same fields with the same defaults."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from agent_runner.contract import USD_CAP_PATTERN, USD_PER_RUN_PATTERN
from nocturne_operator.api.model import AgentScheduleSpec
from nocturne_operator.controller.reconcile import OWNED_STATUS

CRD_FILE = Path(__file__).parents[2] / "crds" / "agentschedules.nocturne.dev.yaml"


def crd() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(CRD_FILE.read_text())
    return doc


def version() -> dict[str, Any]:
    [v] = crd()["spec"]["versions"]
    return dict(v)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def model_tree(model: type[BaseModel], prefix: str = "spec") -> dict[str, Any]:
    """path -> default (or ... when required) for every field, nested models expanded."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        path = f"{prefix}.{info.alias or name}"
        out[path] = ... if info.is_required() else info.get_default(call_default_factory=True)
        nested = _model_of(info.annotation)
        if nested is not None:
            out.update(model_tree(nested, path))
    return out


def schema_tree(schema: dict[str, Any], prefix: str = "spec") -> dict[str, Any]:
    out: dict[str, Any] = {}
    required = set(schema.get("required", []))
    for name, sub in schema.get("properties", {}).items():
        path = f"{prefix}.{name}"
        out[path] = ... if name in required else sub.get("default")
        if sub.get("type") == "object" and "properties" in sub:
            out.update(schema_tree(sub, path))
    return out


def test_crd_and_model_have_the_same_fields_and_defaults() -> None:
    spec_schema = version()["schema"]["openAPIV3Schema"]["properties"]["spec"]
    from_crd = schema_tree(spec_schema)
    from_model = model_tree(AgentScheduleSpec)
    assert sorted(from_crd) == sorted(from_model)
    for path, default in from_crd.items():
        model_default = from_model[path]
        if default is None or model_default is ...:
            assert (default is ...) == (model_default is ...), path
            continue
        if isinstance(model_default, BaseModel | list | dict):
            continue  # nested objects get their defaults field by field
        value = getattr(model_default, "value", model_default)
        assert value == default, path


def test_names_printer_columns_and_status_subresource() -> None:
    doc = crd()
    assert doc["metadata"]["name"] == "agentschedules.nocturne.dev"
    names = doc["spec"]["names"]
    assert names["shortNames"] == ["asched"]
    assert names["categories"] == ["nocturne"]
    v = version()
    assert v["name"] == "v1alpha1"
    assert v["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in v["additionalPrinterColumns"]}
    assert columns == {
        "Schedule": ".spec.schedule",
        "Zone": ".spec.timeZone",
        "Suspended": ".spec.suspend",
        "Ready": '.status.conditions[?(@.type=="Ready")].status',
        "Phase": ".status.phase",
        "Next Run": ".status.nextRunLocal",
        "Running": ".status.activeRun.summary",
        "Last Result": ".status.lastRun.result",
        "Cost USD": ".status.totalCostUSD",
        "Age": ".metadata.creationTimestamp",
    }


def test_status_declares_every_field_the_operator_writes() -> None:
    status = version()["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert set(OWNED_STATUS) <= set(status)


def test_money_is_never_a_number_in_the_api() -> None:
    text = CRD_FILE.read_text()
    schema = yaml.safe_load(text)

    def walk(node: Any, path: str) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item, path)
        if isinstance(node, dict):
            if "USD" in path.rsplit(".", 1)[-1]:
                assert node.get("type") == "string", path
            for key, value in node.items():
                walk(value, f"{path}.{key}" if key != "properties" else path)

    walk(schema, "")


def test_budget_patterns_are_the_contracts() -> None:
    """The CRD, the operator's model and the task snapshot take a cap by one pattern each."""
    budget = version()["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["budget"]
    fields = budget["properties"]
    assert fields["maxPerRunUSD"]["pattern"] == USD_PER_RUN_PATTERN
    assert fields["maxTotalUSD"]["pattern"] == USD_CAP_PATTERN
    assert fields["maxMonthlyUSD"]["pattern"] == USD_CAP_PATTERN

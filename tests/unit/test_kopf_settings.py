"""kopf's settings: only our CronJobs, Jobs and pods are watched, server-side (issue 18)."""

from __future__ import annotations

import kopf
import pytest

from nocturne_operator.controller.handlers import tune

OURS = "app.kubernetes.io/managed-by=nocturne-operator"


def tuned() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    tune(settings)
    return settings


@pytest.mark.parametrize(
    ("group", "version", "plural"),
    [("batch", "v1", "cronjobs"), ("batch", "v1", "jobs"), ("", "v1", "pods")],
)
def test_our_cronjobs_jobs_and_pods_are_selected_by_the_apiserver(
    group: str, version: str, plural: str
) -> None:
    selectors = tuned().watching.label_selectors
    assert selectors.collect(kopf.Resource(group, version, plural)) == [OURS]


@pytest.mark.parametrize(
    ("group", "version", "plural"),
    [
        ("nocturne.dev", "v1alpha1", "agentschedules"),  # users' schedules carry no label
        ("", "v1", "namespaces"),
        ("apiextensions.k8s.io", "v1", "customresourcedefinitions"),
    ],
)
def test_everything_else_is_watched_whole(group: str, version: str, plural: str) -> None:
    selectors = tuned().watching.label_selectors
    assert selectors.collect(kopf.Resource(group, version, plural)) == []


def test_kopf_waits_long_enough_for_its_own_patch_and_keeps_its_annotations_apart() -> None:
    settings = tuned()
    assert settings.persistence.consistency_timeout >= 30
    assert settings.persistence.finalizer == "kopf.nocturne.dev/finalizer"

"""kopf's settings: only our CronJobs, Jobs and pods are watched, server-side (issue 18)."""

from __future__ import annotations

import kopf
import pytest

from nocturne_operator.controller.handlers import tune  # importing it registers the handlers

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


def test_kopf_storage_is_named_apart_from_users_annotations() -> None:
    settings = tuned()
    assert settings.persistence.finalizer == "kopf.nocturne.dev/finalizer"


def test_every_handler_only_watches_so_kopf_writes_nothing_on_our_objects() -> None:
    """Change-detecting handlers (create/update/resume/delete) make kopf patch its
    bookkeeping annotations onto every object (issue 13: 1.88 writes per schedule created)
    and wait for their echo; watching handlers and indexes store nothing."""
    registry = kopf.get_default_registry()
    schedules = kopf.Resource("nocturne.dev", "v1alpha1", "agentschedules")
    watching = [h.id for h in registry._watching.get_all_handlers()]
    assert "schedule_event" in watching
    assert not registry._changing.get_all_handlers()
    assert not registry._spawning.get_all_handlers()
    assert not registry._changing.has_handlers(resource=schedules)

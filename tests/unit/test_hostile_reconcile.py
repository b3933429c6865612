"""A schedule whose zone names a tzdata directory (or the node's zone) reaches the reconcile: it
must end in InvalidSpec with the old CronJob suspended, never an exception on every pass."""

from __future__ import annotations

import pytest

from nocturne_operator.api import conditions as cond
from unit.test_reconcile_rails import Cluster, schedule


@pytest.mark.parametrize("zone", ["America", "localtime", "posixrules", "right/UTC", "posix/UTC"])
def test_a_zone_that_is_no_iana_name_is_invalid_spec_and_suspends_the_cronjob(zone: str) -> None:
    cluster = Cluster(schedule())
    assert not cluster.cronjob_suspended
    cluster.objects.items[("AgentSchedule", "digest")]["spec"]["timeZone"] = zone
    cluster.objects.items[("AgentSchedule", "digest")]["metadata"]["generation"] = 2
    assert cluster.reconcile(None) == cond.PHASE_INVALID
    ready = cluster.condition(cond.READY)
    assert (ready["status"], ready["reason"]) == ("False", cond.INVALID_SPEC)
    assert ready["message"] == (
        f'spec.timeZone "{zone}": not an IANA time zone name (e.g. Asia/Tokyo)'
    )
    assert cluster.cronjob_suspended
    # The next pass changes nothing.
    patches = len(cluster.objects.patches)
    assert cluster.reconcile(None) == cond.PHASE_INVALID
    assert len(cluster.objects.patches) == patches

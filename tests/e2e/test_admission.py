"""Errors at `kubectl apply` time (issue 15): the apiserver calls the operator's validating
webhook for real (the ValidatingWebhookConfiguration kopf keeps pointed at the operator, with its
CA), so an AgentSchedule the operator would mark invalid is refused at apply time with the same
field-named message, `--dry-run=server` included; with the operator dead, `failurePolicy:
Ignore` lets it in and the next operator reports it on status."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
import yaml

from e2e.conftest import operator_process
from e2e.schedules import condition, schedule
from harness import controlplane
from harness.kube import Cluster, Kubectl, wait_for

pytestmark = pytest.mark.e2e

RULE = "runs as often as every 5 min (in UTC), minimum interval is 60 min"


def every_five_minutes(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "nocturne.dev/v1alpha1",
        "kind": "AgentSchedule",
        "metadata": {"name": name},
        "spec": {
            "schedule": "*/5 * * * *",
            "task": {"query": "status check"},
            "agent": {"model": "offline-demo", "provider": "offline"},
            "budget": {"maxPerRunUSD": "0.10"},
        },
    }


def apply(kubectl: Kubectl, namespace: str, body: dict[str, Any], *flags: str) -> Any:
    return subprocess.run(
        [str(kubectl.binary), f"--kubeconfig={kubectl.kubeconfig}", "apply", "-n", namespace,
         *flags, "-f", "-"],
        input=yaml.safe_dump(body),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip


def test_apply_fails_with_the_field_named_message_and_a_stopped_operator_blocks_nobody(
    cluster: Cluster, kubectl: Kubectl, solo_namespace: str, crds: None
) -> None:
    del crds
    namespace = solo_namespace
    [port] = controlplane.free_ports(1)
    configuration = f"{namespace}.validate.nocturne.dev"
    env = {
        "NOCTURNE_WEBHOOK_PORT": str(port),
        "NOCTURNE_WEBHOOK_BIND": "127.0.0.1",
        "NOCTURNE_WEBHOOK_HOST": "127.0.0.1",
        "NOCTURNE_WEBHOOK_CONFIGURATION": configuration,
    }
    try:
        with operator_process(
            cluster,
            database_url=None,
            watch_namespaces=namespace,
            extra_env=env,
            log_name=f"{namespace}-webhook",
        ) as operator:
            webhook = wait_for(
                lambda: kubectl(
                    "get", "validatingwebhookconfiguration", configuration, "-o", "json",
                    check=False,
                ),
                60,
                "kopf to register the webhook",
            )  # fmt: skip
            # One webhook for schedules, one for AgentSchedulePolicies.
            hooks = {h["name"].split(".")[0]: h for h in json.loads(webhook)["webhooks"]}
            assert sorted(hooks) == ["agentschedulepolicies", "agentschedules"]
            hook = hooks["agentschedules"]
            assert hook["failurePolicy"] == "Ignore"
            assert hook["clientConfig"]["caBundle"]  # the operator's CA
            refused = apply(kubectl, namespace, every_five_minutes("too-often"))
            assert refused.returncode != 0
            assert "denied the request" in refused.stderr
            assert f'spec.schedule "*/5 * * * *": {RULE}' in refused.stderr
            dry = apply(kubectl, namespace, every_five_minutes("too-often"), "--dry-run=server")
            assert dry.returncode != 0
            assert RULE in dry.stderr
            assert kubectl("get", "asched", "-n", namespace, "-o", "name") == ""
            # A valid schedule goes in; an annotation on it (no spec change) is never refused.
            hourly = every_five_minutes("hourly")
            hourly["spec"]["schedule"] = "0 * * * *"
            accepted = apply(kubectl, namespace, hourly)
            assert accepted.returncode == 0, accepted.stderr
            kubectl("annotate", "-n", namespace, "asched/hourly", "nocturne.dev/run-now=one")
            # The operator dies (a graceful stop would leave the webhook too: it is persistent,
            # for the other replica): the configuration still names it, the apiserver's call
            # fails, and Ignore lets the schedule in ...
            operator.process.kill()
            operator.process.wait(timeout=30)
        assert kubectl("get", "validatingwebhookconfiguration", configuration, "-o", "name")
        stopped = apply(kubectl, namespace, every_five_minutes("too-often"))
        assert stopped.returncode == 0, stopped.stderr
        # ... and the next operator reports it on status, with the same message.
        with operator_process(
            cluster,
            database_url=None,
            watch_namespaces=namespace,
            log_name=f"{namespace}-status",
        ):
            ready = wait_for(
                lambda: condition(schedule(kubectl, namespace, "too-often"), "Ready"),
                60,
                "the status of the schedule the webhook could not refuse",
            )
        assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
        assert RULE in ready["message"]
    finally:
        kubectl("delete", "validatingwebhookconfiguration", configuration, check=False)

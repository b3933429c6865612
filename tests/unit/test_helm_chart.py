"""The Helm chart, rendered by the pinned helm binary: copies of generated artifacts match their
source, rendering is deterministic and lint-clean, RBAC is least privilege, the operator pods
are hardened and replicated (one leads by Lease), the settings file is one the operator
accepts, and the values schema rejects bad values with messages that name the key and the
rule."""

from __future__ import annotations

import functools
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import tools
from harness.prerequisites import skip_or_fail
from nocturne_operator.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "nocturne"
RELEASE, NAMESPACE = "nocturne", "nocturne-system"

# A values set that turns on every optional part, so each template is rendered and checked.
EVERYTHING = (
    "--set=postgresql.enabled=true",
    "--set=postgresql.auth.password=demo-password",
    "--set=operator.watchNamespaces={team-a,team-b}",
    "--set=networkPolicy.enabled=true",
    "--set=metrics.serviceMonitor.enabled=true",
    "--set=dashboards.enabled=true",
    "--set=alerts.enabled=true",
)
VARIANTS = {"defaults": (), "everything": EVERYTHING}


@functools.cache
def helm() -> Path:
    try:
        return tools.ensure().helm
    except (tools.ToolsError, OSError) as exc:
        skip_or_fail(f"the pinned helm binary is not available: {exc}")
        raise  # unreachable: skip_or_fail raises


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm()), *args], capture_output=True, text=True, timeout=120, check=False
    )


def template_text(*args: str) -> str:
    result = run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def render(*args: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(template_text(*args)) if doc]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in of_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = one(docs, "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# Generated artifacts and their sources


def test_chart_crd_is_a_byte_copy_of_crds() -> None:
    source = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    copied = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert copied == source
    for name in source:
        assert (CHART / "crds" / name).read_bytes() == (REPO / "crds" / name).read_bytes(), (
            f"helm/nocturne/crds/{name} differs from crds/{name}: copy it into the chart"
        )


def test_price_table_configmap_is_the_packaged_table() -> None:
    packaged = (REPO / "operator" / "data" / "prices.yaml").read_text()
    assert (CHART / "files" / "prices.yaml").read_text() == packaged, (
        "cp operator/data/prices.yaml helm/nocturne/files/prices.yaml"
    )
    configmap = one(render(), "ConfigMap", f"{RELEASE}-prices")
    assert configmap["data"]["prices.yaml"] == packaged


def test_price_table_override_replaces_the_table() -> None:
    table = "version: 1\nupdated: 2026-01-01\ncurrency: USD\nproviders: {}\n"
    docs = render(f"--set-string=priceTable.override={table}")
    assert one(docs, "ConfigMap", f"{RELEASE}-prices")["data"]["prices.yaml"] == table


# Deterministic, lint-clean rendering


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendering_is_byte_identical(variant: str) -> None:
    assert template_text(*VARIANTS[variant]) == template_text(*VARIANTS[variant])


def test_templates_use_no_lookup_random_or_time() -> None:
    nondeterministic = re.compile(
        r"\b(lookup|randAlpha|randAlphaNum|randNumeric|randAscii|randBytes|randInt|uuidv4|now|"
        r"date|dateInZone|unixEpoch|genCA|genPrivateKey|genSelfSignedCert|genSignedCert|"
        r"derivePassword|htpasswd)\b"
    )
    for path in sorted((CHART / "templates").iterdir()):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            actions = " ".join(re.findall(r"\{\{(.*?)\}\}", line))
            assert not nondeterministic.search(actions), f"{path.name}:{number}: {line.strip()}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_helm_lint_is_clean(variant: str) -> None:
    result = run_helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, *VARIANTS[variant])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout
    assert "[ERROR]" not in result.stdout


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_object_has_the_standard_labels(variant: str) -> None:
    for doc in render(*VARIANTS[variant]):
        labels = doc["metadata"].get("labels", {})
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        assert labels.get("app.kubernetes.io/name") == "nocturne", where
        assert labels.get("app.kubernetes.io/instance") == RELEASE, where
        assert labels.get("app.kubernetes.io/managed-by") == "Helm", where
        assert labels.get("app.kubernetes.io/part-of") == "nocturne", where
        assert labels.get("app.kubernetes.io/component"), where
        assert labels.get("app.kubernetes.io/version") == "0.1.0", where
        assert labels.get("helm.sh/chart") == "nocturne-0.1.0", where


# RBAC

# (apiGroup, resource) -> verbs: the whole of what the operator may do in the namespaces it
# serves. A new permission must be added here on purpose.
NAMESPACED_RULES = {
    ("nocturne.dev", "agentschedules"): {"get", "list", "watch", "patch"},
    ("nocturne.dev", "agentschedules/status"): {"get", "patch", "update"},
    ("nocturne.dev", "agentschedules/finalizers"): {"update"},
    ("batch", "cronjobs"): {"get", "list", "watch", "create", "patch", "update", "delete"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "delete"},
    # Only to remove earlier versions' task ConfigMaps once: Jobs carry their task snapshot.
    ("", "configmaps"): {"delete"},
    ("", "events"): {"create", "patch"},
    ("", "pods"): {"get", "list", "watch", "patch"},
    # Webhook URLs of spec.notifications, by name only.
    ("", "secrets"): {"get"},
}


def rules_of(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    found: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                found.setdefault((group, resource), set()).update(rule["verbs"])
    return found


def bindings(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield from (d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding"))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rbac_has_no_wildcards_and_reads_secrets_only_by_name(variant: str) -> None:
    docs = render(*VARIANTS[variant])
    roles = [d for d in docs if d["kind"] in ("Role", "ClusterRole")]
    assert roles
    for role in roles:
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule.get(field, []), f"{role['metadata']['name']}: {rule}"
            assert "resourceNames" not in rule or rule["resourceNames"]
            assert "nonResourceURLs" not in rule
            if "secrets" in rule["resources"]:
                assert rule["resources"] == ["secrets"]
                assert "list" not in rule["verbs"], "Secrets are read by name, never listed"
                assert "watch" not in rule["verbs"], "Secrets are read by name, never watched"
                if role["kind"] == "ClusterRole":
                    assert rule["verbs"] == ["get"], "tenant Secrets: read by name only"
                else:
                    # The run API's own CA, in the release namespace: created once, then
                    # read and renewed by its one name.
                    assert role["metadata"]["namespace"] == NAMESPACE
                    assert rule["verbs"] == ["create"] or (
                        rule["verbs"] == ["get", "update"]
                        and rule["resourceNames"] == [f"{RELEASE}-run-api-tls"]
                    ), rule
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])


AGENTRUNS_CLUSTER_BINDINGS = {
    "system:auth-delegator",
    f"{RELEASE}-operator-apiservice",
    f"{RELEASE}-operator-webhook",
}


def test_the_webhook_is_served_on_its_port_and_kopf_may_keep_only_its_configuration() -> None:
    docs = render()
    ports = {p["name"]: p["containerPort"] for p in operator_container(docs)["ports"]}
    assert ports["webhook"] == 9443
    role = one(docs, "ClusterRole", f"{RELEASE}-operator-webhook")
    create, own = role["rules"]
    assert (create["verbs"], create.get("resourceNames")) == (["create"], None)
    assert own["resourceNames"] == [f"{RELEASE}.validate.nocturne.dev"]
    settings = yaml.safe_load(
        one(docs, "ConfigMap", f"{RELEASE}-settings")["data"]["settings.yaml"]
    )
    assert settings["webhook_port"] == 9443
    assert settings["webhook_host"] == f"{RELEASE}-webhook.{NAMESPACE}.svc"
    assert settings["webhook_failure_policy"] == "Ignore"
    strict = yaml.safe_load(
        one(render("--set=webhook.failurePolicy=Fail"), "ConfigMap", f"{RELEASE}-settings")["data"][
            "settings.yaml"
        ]
    )
    assert strict["webhook_failure_policy"] == "Fail"
    bad = run_helm(
        "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
        "--set=webhook.failurePolicy=Sometimes",
    )  # fmt: skip
    assert bad.returncode != 0
    assert "failurePolicy" in bad.stderr
    off = render("--set=webhook.enabled=false")
    assert "webhook" not in {p["name"] for p in operator_container(off)["ports"]}


def assert_agentruns_reader_binding(docs: list[dict[str, Any]]) -> None:
    [reader] = [
        b for b in of_kind(docs, "RoleBinding") if b["metadata"]["namespace"] == "kube-system"
    ]
    assert reader["roleRef"]["name"] == "extension-apiserver-authentication-reader"


def test_the_agentruns_api_is_an_apiservice_with_aggregated_read_roles() -> None:
    docs = render()
    [service] = of_kind(docs, "APIService")
    assert service["metadata"]["name"] == "v1alpha1.runs.nocturne.dev"
    assert service["spec"]["service"] == {
        "namespace": NAMESPACE,
        "name": f"{RELEASE}-runs-api",
        "port": 443,
    }
    assert "caBundle" not in service["spec"]  # the operator sets it: no key material here
    view = one(docs, "ClusterRole", f"{RELEASE}-agentruns-view")
    assert rules_of(view) == {("runs.nocturne.dev", "agentruns"): {"get", "list", "watch"}}
    for role in ("view", "edit", "admin"):
        assert (
            view["metadata"]["labels"][f"rbac.authorization.k8s.io/aggregate-to-{role}"] == "true"
        )
    apiservice_role = one(docs, "ClusterRole", f"{RELEASE}-operator-apiservice")
    [rule] = apiservice_role["rules"]
    assert (rule["resourceNames"], sorted(rule["verbs"])) == (
        ["v1alpha1.runs.nocturne.dev"],
        ["get", "patch"],
    )
    ports = {p["name"]: p["containerPort"] for p in operator_container(docs)["ports"]}
    assert ports["runs-api"] == 8444
    off = render("--set=runsApi.enabled=false")
    assert of_kind(off, "APIService") == []
    assert "runs-api" not in {p["name"] for p in operator_container(off)["ports"]}


def test_cluster_wide_operator_gets_exactly_its_rules_everywhere() -> None:
    docs = render()
    role = one(docs, "ClusterRole", f"{RELEASE}-operator")
    assert rules_of(role) == NAMESPACED_RULES
    discovery = one(docs, "ClusterRole", f"{RELEASE}-operator-discovery")
    # kopf follows CRDs; namespaces' labels decide which AgentSchedulePolicies apply.
    assert rules_of(discovery) == {
        ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
        # The run API checks each runner's pod-bound token.
        ("authentication.k8s.io", "tokenreviews"): {"create"},
        ("", "namespaces"): {"get", "list", "watch"},
        ("nocturne.dev", "agentschedulepolicies"): {"get", "list", "watch"},
        ("nocturne.dev", "agentschedulepolicies/status"): {"get", "patch"},
    }
    assert {b["roleRef"]["name"] for b in of_kind(docs, "ClusterRoleBinding")} == {
        f"{RELEASE}-operator",
        f"{RELEASE}-operator-discovery",
        *AGENTRUNS_CLUSTER_BINDINGS,
    }
    # RoleBindings: the run API's CA Secret and the leader election Lease in the release
    # namespace, and (the agentruns API) the apiserver's request-header settings in kube-system.
    own = [b for b in of_kind(docs, "RoleBinding") if b["metadata"]["namespace"] == NAMESPACE]
    assert {b["roleRef"]["name"] for b in own} == {
        f"{RELEASE}-operator-run-api-tls",
        f"{RELEASE}-operator-leader-election",
    }
    assert {b["roleRef"]["kind"] for b in own} == {"Role"}
    assert_agentruns_reader_binding(docs)
    assert env_of(operator_container(docs))["NOCTURNE_WATCH_NAMESPACES"] == ""


def test_notifications_off_drops_secret_access_and_webhook_egress() -> None:
    on = render("--set=networkPolicy.enabled=true")
    off = render("--set=networkPolicy.enabled=true", "--set=notifications.enabled=false")
    assert ("", "secrets") in rules_of(one(on, "ClusterRole", f"{RELEASE}-operator"))
    assert ("", "secrets") not in rules_of(one(off, "ClusterRole", f"{RELEASE}-operator"))

    def egress_ports(docs: list[dict[str, Any]]) -> list[int]:
        policy = one(docs, "NetworkPolicy", f"{RELEASE}-operator")
        return [p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]]

    assert 443 in egress_ports(on)
    webhook_rule = one(on, "NetworkPolicy", f"{RELEASE}-operator")["spec"]["egress"][-1]
    assert webhook_rule["to"][0]["ipBlock"]["except"] == ["169.254.0.0/16"]
    assert egress_ports(off).count(443) == 1  # the API server's port only


def test_watched_namespaces_get_role_bindings_only_there() -> None:
    docs = render("--set=operator.watchNamespaces={team-a,team-b}")
    role_bindings = [
        b for b in of_kind(docs, "RoleBinding") if b["roleRef"]["kind"] == "ClusterRole"
    ]
    assert sorted(b["metadata"]["namespace"] for b in role_bindings) == ["team-a", "team-b"]
    own = [
        b
        for b in of_kind(docs, "RoleBinding")
        if b["roleRef"]["kind"] == "Role" and b["metadata"]["namespace"] != "kube-system"
    ]
    # The run API's CA Secret and the leader election Lease, in the release namespace.
    assert {b["metadata"]["namespace"] for b in own} == {NAMESPACE}
    assert len(own) == 2
    assert_agentruns_reader_binding(docs)
    for binding in role_bindings:
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": f"{RELEASE}-operator",
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": f"{RELEASE}-operator", "namespace": NAMESPACE}
        ]
    # No cluster-wide grant of the namespaced rules; namespaces list/watch for kopf instead.
    assert {b["roleRef"]["name"] for b in of_kind(docs, "ClusterRoleBinding")} == {
        f"{RELEASE}-operator-discovery",
        *AGENTRUNS_CLUSTER_BINDINGS,
    }
    discovery = one(docs, "ClusterRole", f"{RELEASE}-operator-discovery")
    assert rules_of(discovery)[("", "namespaces")] == {"get", "list", "watch"}
    assert env_of(operator_container(docs))["NOCTURNE_WATCH_NAMESPACES"] == "team-a,team-b"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_runner_service_account_has_no_bindings_and_no_token(variant: str) -> None:
    docs = render(*VARIANTS[variant])
    runner_accounts = [
        d for d in of_kind(docs, "ServiceAccount") if d["metadata"]["name"] == f"{RELEASE}-runner"
    ]
    for account in runner_accounts:
        assert account["automountServiceAccountToken"] is False
    for binding in bindings(docs):
        for subject in binding["subjects"]:
            assert subject["name"] != f"{RELEASE}-runner", binding["metadata"]["name"]
    if variant == "everything":
        assert sorted(a["metadata"]["namespace"] for a in runner_accounts) == ["team-a", "team-b"]


def test_runner_service_account_is_used_only_where_it_exists() -> None:
    def settings_of(*args: str) -> dict[str, Any]:
        data = one(render(*args), "ConfigMap", f"{RELEASE}-settings")["data"]["settings.yaml"]
        loaded: dict[str, Any] = yaml.safe_load(data)
        return loaded

    # Serving every namespace: no per-namespace account exists, the namespace default is used.
    assert settings_of()["runner_service_account"] == ""
    watched = settings_of("--set=operator.watchNamespaces={team-a}")
    assert watched["runner_service_account"] == f"{RELEASE}-runner"
    not_created = settings_of(
        "--set=operator.watchNamespaces={team-a}", "--set=runner.serviceAccount.create=false"
    )
    assert not_created["runner_service_account"] == ""
    own = settings_of("--set=runner.serviceAccount.name=agents")
    assert own["runner_service_account"] == "agents"


# The operator Deployment


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_operator_is_two_hardened_pods_rolled_one_at_a_time(variant: str) -> None:
    docs = render(*VARIANTS[variant])
    deployment = one(docs, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    # A new replica serves before an old one stops: reports always have somewhere to go.
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == f"{RELEASE}-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = operator_container(docs)
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}, probe
    # Readiness is serving reports (every replica), not leading.
    assert container["readinessProbe"]["httpGet"] == {
        "path": "/healthz",
        "port": "run-api",
        "scheme": "HTTPS",
    }
    env = env_of(container)
    assert env["NOCTURNE_HEALTH_ENDPOINT"] == "http://0.0.0.0:8080/healthz"
    # Replicas prefer different nodes; the drain fits in the grace period.
    [term] = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    labels = term["podAffinityTerm"]["labelSelector"]["matchLabels"]
    assert labels.items() <= spec["template"]["metadata"]["labels"].items()
    assert labels == spec["selector"]["matchLabels"]
    assert pod["terminationGracePeriodSeconds"] > 5 + 10


def test_two_replicas_get_a_disruption_budget_and_their_lease_by_name() -> None:
    docs = render()
    deployment = one(docs, "Deployment")
    budget = one(docs, "PodDisruptionBudget")
    assert budget["spec"] == {
        "minAvailable": 1,
        "selector": {"matchLabels": deployment["spec"]["selector"]["matchLabels"]},
    }
    role = one(docs, "Role", f"{RELEASE}-operator-leader-election")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": [f"{RELEASE}-operator"],
            "verbs": ["get", "update"],
        },
    ]
    binding = one(docs, "RoleBinding", f"{RELEASE}-operator-leader-election")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": f"{RELEASE}-operator", "namespace": NAMESPACE}
    ]
    settings = yaml.safe_load(
        one(docs, "ConfigMap", f"{RELEASE}-settings")["data"]["settings.yaml"]
    )
    assert settings["leader_lease_name"] == f"{RELEASE}-operator"
    assert settings["run_api_tls_namespace"] == NAMESPACE  # where the Lease lives
    assert (settings["leader_retry_seconds"], settings["leader_renew_deadline_seconds"]) == (2, 10)
    assert (settings["leader_lease_seconds"], settings["shutdown_drain_seconds"]) == (15, 5)


def test_the_roll_can_replace_instead_of_surging() -> None:
    docs = render(
        "--set=operator.rollingUpdate.maxSurge=0", "--set=operator.rollingUpdate.maxUnavailable=1"
    )
    assert one(docs, "Deployment")["spec"]["strategy"]["rollingUpdate"] == {
        "maxUnavailable": 1,
        "maxSurge": 0,
    }


def test_one_replica_gets_no_disruption_budget_and_own_affinity_wins() -> None:
    docs = render("--set=operator.replicas=1", "--set=operator.affinity.nodeAffinity.x=y")
    assert one(docs, "Deployment")["spec"]["replicas"] == 1
    assert not of_kind(docs, "PodDisruptionBudget")  # it would block every drain
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["affinity"] == {"nodeAffinity": {"x": "y"}}


def test_operator_reads_the_database_url_from_the_existing_secret() -> None:
    docs = render("--set=database.existingSecret=pg", "--set=database.secretKey=dsn")
    expected = {"secretKeyRef": {"name": "pg", "key": "dsn"}}
    assert env_of(operator_container(docs))["NOCTURNE_DATABASE_URL"] == expected
    job = one(docs, "Job")
    [migrate] = job["spec"]["template"]["spec"]["containers"]
    assert env_of(migrate)["NOCTURNE_DATABASE_URL"] == expected


def test_settings_file_is_mounted_and_accepted_by_the_operator(tmp_path: Path) -> None:
    docs = render(
        "--set=limits.maxSchedulesPerNamespace=7",
        "--set=limits.minIntervalMinutes=30",
        "--set-string=limits.maxPerRunUSD=2.50",
        "--set=runner.image.repository=registry.example/nocturne-runner",
        "--set=runner.image.tag=1.2.3",
        "--set=operator.reconcileIntervalSeconds=15",
        "--set=operator.resyncIntervalSeconds=900",
    )
    container = operator_container(docs)
    config_file = Path(env_of(container)["NOCTURNE_CONFIG_FILE"])
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == str(config_file.parent)]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    configmap = one(docs, "ConfigMap", volume["configMap"]["name"])
    path = tmp_path / config_file.name
    path.write_text(configmap["data"][config_file.name])
    settings = load_settings(config_file=path)
    assert settings.max_schedules_per_namespace == 7
    assert settings.min_interval_minutes == 30
    assert str(settings.max_per_run_usd) == "2.50"
    assert settings.runner_image == "registry.example/nocturne-runner:1.2.3"
    assert settings.reconcile_interval_seconds == 15
    assert settings.resync_interval_seconds == 900
    assert settings.llm_secrets == ["llm-credentials"]
    assert settings.llm_base_urls == ["https://api.openai.com/v1", "https://api.anthropic.com"]
    assert settings.webhook_secrets == ["slack"]
    assert settings.webhook_allow_private is False


def settings_of(tmp_path: Path, *args: str) -> Any:
    """The operator's settings as the chart renders them with ``args``."""
    configmap = one(render(*args), "ConfigMap", f"{RELEASE}-settings")
    path = tmp_path / "settings.yaml"
    path.write_text(configmap["data"]["settings.yaml"])
    return load_settings(config_file=path)


def test_allowed_secrets_and_endpoints_reach_the_settings(tmp_path: Path) -> None:
    settings = settings_of(
        tmp_path,
        "--set=llm.secrets={team-llm,shared-llm}",
        "--set=llm.baseURLs={https://llm.internal:8443/v1,http://vllm.models.svc:8000/v1}",
        "--set=notifications.webhookSecrets={team-hook}",
        "--set=notifications.webhookAllowPrivate=true",
    )
    assert settings.llm_secrets == ["team-llm", "shared-llm"]
    assert settings.llm_base_urls == [
        "https://llm.internal:8443/v1",
        "http://vllm.models.svc:8000/v1",
    ]
    assert settings.webhook_secrets == ["team-hook"]
    assert settings.webhook_allow_private is True


def test_empty_allow_lists_render_as_empty_lists(tmp_path: Path) -> None:
    values = tmp_path / "closed.yaml"
    values.write_text("llm: {secrets: [], baseURLs: []}\nnotifications: {webhookSecrets: []}\n")
    settings = settings_of(tmp_path, "-f", str(values))
    assert (settings.llm_secrets, settings.llm_base_urls, settings.webhook_secrets) == ([], [], [])


def test_a_settings_change_rolls_the_operator() -> None:
    def pod_annotations(*args: str) -> dict[str, str]:
        deployment = one(render(*args), "Deployment")
        annotations: dict[str, str] = deployment["spec"]["template"]["metadata"]["annotations"]
        return annotations

    before = pod_annotations()
    after = pod_annotations("--set=limits.minIntervalMinutes=30")
    assert before["checksum/settings"] != after["checksum/settings"]
    assert before["checksum/prices"] == after["checksum/prices"]


def test_images_default_to_the_app_version_and_digests_win() -> None:
    docs = render()
    assert operator_container(docs)["image"] == "ghcr.io/nocturne-dev/nocturne-operator:0.1.0"
    digest = "sha256:" + "a" * 64
    pinned = render(f"--set=operator.image.digest={digest}")
    assert operator_container(pinned)["image"] == f"ghcr.io/nocturne-dev/nocturne-operator@{digest}"


# Migration hook and the bundled PostgreSQL


def test_migration_job_is_a_pre_install_hook_without_api_access() -> None:
    job = one(render(), "Job")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    assert "helm.sh/hook-weight" in annotations
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    [container] = pod["containers"]
    assert container["command"] == ["nocturne", "db", "upgrade"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_bundled_postgresql_migrates_after_install_and_never_generates_a_password() -> None:
    docs = render(*EVERYTHING)
    job = one(docs, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    [migrate] = job["spec"]["template"]["spec"]["containers"]
    url = env_of(migrate)["NOCTURNE_DATABASE_URL"]
    assert url == (
        "postgresql+psycopg://nocturne:$(NOCTURNE_POSTGRES_PASSWORD)"
        f"@{RELEASE}-postgresql.{NAMESPACE}.svc:5432/nocturne"
    )
    secret = one(docs, "Secret", f"{RELEASE}-postgresql")
    assert secret["stringData"] == {"password": "demo-password"}
    # The fence: runner pods report through the run API; no namespace but the release's gets a
    # Secret (the database password stays with the operator and the migration Job).
    assert {s["metadata"]["namespace"] for s in of_kind(docs, "Secret")} == {NAMESPACE}
    assert one(docs, "StatefulSet")["spec"]["replicas"] == 1


def test_bundled_postgresql_can_take_its_password_from_an_existing_secret() -> None:
    docs = render("--set=postgresql.enabled=true", "--set=postgresql.auth.existingSecret=pg-auth")
    assert not [s for s in of_kind(docs, "Secret") if s["metadata"]["name"].endswith("postgresql")]
    env = env_of(operator_container(docs))
    assert env["NOCTURNE_POSTGRES_PASSWORD"] == {
        "secretKeyRef": {"name": "pg-auth", "key": "password"}
    }


def test_optional_parts_are_off_by_default() -> None:
    kinds = {d["kind"] for d in render()}
    assert not kinds & {"StatefulSet", "Secret", "NetworkPolicy", "ServiceMonitor"}
    assert "Service" in kinds  # metrics


def test_network_policies_cover_operator_database_and_runners() -> None:
    docs = render(*EVERYTHING)
    policies = {
        (p["metadata"]["namespace"], p["metadata"]["name"]): p
        for p in of_kind(docs, "NetworkPolicy")
    }
    assert set(policies) == {
        (NAMESPACE, f"{RELEASE}-operator"),
        (NAMESPACE, f"{RELEASE}-postgresql"),
        ("team-a", f"{RELEASE}-runner"),
        ("team-b", f"{RELEASE}-runner"),
    }
    runner = policies[("team-a", f"{RELEASE}-runner")]["spec"]
    assert runner["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in runner  # nothing may connect to a runner pod
    assert runner["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "agent-run"


# values.schema.json


def test_schema_forbids_unknown_keys_at_every_level() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                assert node.get("additionalProperties") is False, where
            for key, child in node.items():
                walk(child, f"{where}/{key}")
        elif isinstance(node, list):
            for index, child in enumerate(node):
                walk(child, f"{where}[{index}]")

    walk(schema, "")


BAD_VALUES = [
    (("--set=limitz.maxSchedulesPerNamespace=5",), "additional properties 'limitz' not allowed"),
    (("--set=operator.replicaz=2",), "additional properties 'replicaz' not allowed"),
    (("--set=operator.replicas=0",), "'/operator/replicas': minimum"),
    (("--set=operator.leaderElection.leaseSecondz=9",), "additional properties 'leaseSecondz'"),
    (("--set=operator.podDisruptionBudget.minAvailable=0",), "minAvailable': minimum"),
    (("--set=operator.rollingUpdate.maxSurge=-1",), "'/operator/rollingUpdate/maxSurge'"),
    (("--set=limits.maxSchedulesPerNamespace=-1",), "'/limits/maxSchedulesPerNamespace': minimum"),
    (("--set=limits.minIntervalMinutes=0",), "'/limits/minIntervalMinutes': minimum"),
    (("--set=limits.maxSchedulesPerNamespace=lots",), "got string, want integer"),
    (("--set-string=limits.maxPerRunUSD=-3",), "'/limits/maxPerRunUSD': '-3' does not match"),
    (("--set=limits.maxPerRunUSD=2.5e1",), "'/limits/maxPerRunUSD'"),
    (("--set=operator.healthPort=70000",), "'/operator/healthPort': maximum"),
    (("--set=operator.watchNamespaces={Team_A}",), "'/operator/watchNamespaces/0'"),
    (("--set=operator.image.pullPolicy=Sometimes",), "'/operator/image/pullPolicy'"),
    (("--set=metrics.enabled=yes-please",), "'/metrics/enabled': got string, want boolean"),
    (("--set=runner.resources.requests.cpu=lots",), "'/runner/resources/requests/cpu'"),
    (("--set=runner.jobs.ttlSecondsAfterFinished=5",), "'/runner/jobs/ttlSecondsAfterFinished'"),
    (("--set=postgresql.auth.password=p@ss/word",), "'/postgresql/auth/password'"),
    (("--set=llm.keys={a}",), "additional properties 'keys' not allowed"),
    (("--set=llm.secrets={Team_Key}",), "'/llm/secrets/0'"),
    (("--set=llm.secrets=llm-credentials",), "'/llm/secrets': got string, want array"),
    (("--set=llm.baseURLs={ftp://models.internal}",), "'/llm/baseURLs/0'"),
    (("--set=llm.baseURLs={https://user:pw@models.internal}",), "'/llm/baseURLs/0'"),
    (("--set=llm.baseURLs={https://models.internal/v1#x}",), "'/llm/baseURLs/0'"),
    (("--set=notifications.webhookSecrets={Slack}",), "'/notifications/webhookSecrets/0'"),
    (
        ("--set=notifications.webhookAllowPrivate=sometimes",),
        "'/notifications/webhookAllowPrivate': got string, want boolean",
    ),
]


@pytest.mark.parametrize(("args", "message"), BAD_VALUES, ids=[a[0][0] for a in BAD_VALUES])
def test_schema_rejects_bad_values_with_a_clear_message(
    args: tuple[str, ...], message: str
) -> None:
    result = run_helm("template", RELEASE, str(CHART), *args)
    assert result.returncode != 0, f"{args} was accepted"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


def test_a_float_budget_in_a_values_file_is_rejected(tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text("limits:\n  maxPerRunUSD: 2.5\n")
    result = run_helm("template", RELEASE, str(CHART), "-f", str(values))
    assert result.returncode != 0
    assert "'/limits/maxPerRunUSD': got number, want string" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--set=postgresql.enabled=true",),
            "set postgresql.auth.password or postgresql.auth.existingSecret",
        ),
        (("--set=database.existingSecret=",), "database.existingSecret is empty"),
        (
            ("--set=operator.leaderElection.renewDeadlineSeconds=20",),
            "need retryPeriodSeconds < renewDeadlineSeconds < leaseSeconds",
        ),
        (
            ("--set=operator.podDisruptionBudget.minAvailable=2",),
            "minAvailable must be below operator.replicas",
        ),
        (
            ("--set=operator.rollingUpdate.maxSurge=0",),
            "maxSurge and maxUnavailable are both 0",
        ),
    ],
)
def test_inconsistent_values_fail_with_the_fix(args: tuple[str, ...], message: str) -> None:
    result = run_helm("template", RELEASE, str(CHART), *args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_notes_tell_what_to_do_next() -> None:
    result = run_helm("install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE)
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert f"rollout status deployment/{RELEASE}-operator" in notes
    assert "create secret generic nocturne-database" not in notes
    assert "no database Secret" in notes
    assert "nocturne.dev/run-now=" in notes
    assert "keeps the CRD and every AgentSchedule" in notes
    # Two replicas: which one reconciles.
    assert f"get lease {RELEASE}-operator" in notes


# docs/helm.md


def value_paths(values: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Every configurable key of values.yaml; resources blocks and free-form maps are one key."""
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "resources":
            yield from value_paths(value, f"{path}.")
        else:
            yield path


def documented_paths(text: str) -> set[str]:
    """Keys named in the values table of docs/helm.md; `.key` after `a.b.c` means `a.b.key`."""
    found: set[str] = set()
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        first_cell = line.split("|")[1]
        parent = ""
        for token in re.findall(r"`([^`]+)`", first_cell):
            if token.startswith(".") and parent:
                found.add(parent + token)
            else:
                found.add(token)
                parent = token.rsplit(".", 1)[0]
    return found


def test_docs_describe_every_value() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    documented = documented_paths((REPO / "docs" / "helm.md").read_text())
    missing = sorted(set(value_paths(values)) - documented)
    assert not missing, f"docs/helm.md's values table lacks {missing}"

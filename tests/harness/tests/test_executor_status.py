"""Kubelet-compatible status documents, termination messages and pod admission (pure)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from harness.executor import (
    ContainerInfo,
    History,
    Termination,
    backoff_status,
    claimed_status,
    exit_code_of,
    grace_seconds,
    merge_conditions,
    pod_hostname,
    read_log_tail,
    read_termination_file,
    rejected_termination,
    restart_delay,
    running_status,
    terminated_status,
    termination_message,
    unsupported_reason,
)

INFO = ContainerInfo("main", "busybox:1.37", "local://busybox")
T0, T1, T2 = "2026-11-26T10:00:00Z", "2026-11-26T10:00:05Z", "2026-11-26T10:01:00Z"


def conditions(status: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status["conditions"]}


def test_claim_running_terminated_sequence() -> None:
    pod: dict[str, Any] = {"metadata": {"name": "p"}, "status": {"phase": "Pending"}}
    claimed = claimed_status(pod, INFO, T0)
    assert claimed["phase"] == "Pending"
    assert claimed["startTime"] == T0
    assert conditions(claimed) == {
        "PodScheduled": "True", "Initialized": "True", "ContainersReady": "False", "Ready": "False"
    }  # fmt: skip
    assert claimed["containerStatuses"][0]["state"] == {"waiting": {"reason": "ContainerCreating"}}

    pod["status"] = claimed
    running = running_status(pod, INFO, 4242, T1, T1)
    assert running["phase"] == "Running"
    assert running["startTime"] == T0  # kept from the claim
    assert set(conditions(running).values()) == {"True"}
    cs = running["containerStatuses"][0]
    assert cs == {
        "name": "main",
        "image": "busybox:1.37",
        "imageID": "local://busybox",
        "containerID": "local://4242",
        "ready": True,
        "started": True,
        "restartCount": 0,
        "state": {"running": {"startedAt": T1}},
    }
    by_type = {c["type"]: c for c in running["conditions"]}
    assert by_type["PodScheduled"]["lastTransitionTime"] == T0  # no flip, no new time
    assert by_type["Ready"]["lastTransitionTime"] == T1

    pod["status"] = running
    term = Termination(3, "Error", "boom", T1, T2, "local://4242")
    done = terminated_status(pod, INFO, term)
    assert done["phase"] == "Failed"
    assert conditions(done)["Ready"] == "False"
    assert {c["type"]: c.get("reason") for c in done["conditions"]}["Ready"] == "PodCompleted"
    assert done["containerStatuses"][0]["state"]["terminated"] == {
        "exitCode": 3,
        "reason": "Error",
        "message": "boom",
        "startedAt": T1,
        "finishedAt": T2,
        "containerID": "local://4242",
    }
    assert done["containerStatuses"][0]["ready"] is False
    assert "reason" not in done


def test_exit_zero_succeeds_unless_forced() -> None:
    pod: dict[str, Any] = {"status": {"startTime": T0}}
    ok = terminated_status(pod, INFO, Termination(0, "Completed", "", T1, T2, "local://1"))
    assert ok["phase"] == "Succeeded"
    assert "message" not in ok["containerStatuses"][0]["state"]["terminated"]
    deadline = Termination(
        0, "Completed", "", T1, T2, "local://1", "DeadlineExceeded", "too slow", force_failed=True
    )
    failed = terminated_status(pod, INFO, deadline)
    assert failed["phase"] == "Failed"
    assert (failed["reason"], failed["message"]) == ("DeadlineExceeded", "too slow")


def test_rejected_pod_fails_with_reason_and_exit_code_128() -> None:
    term = rejected_termination("ErrImageNotMapped", "image 'x' is not in the table", T0)
    status = terminated_status({"status": {}}, INFO, term)
    assert status["phase"] == "Failed"
    assert status["reason"] == "ErrImageNotMapped"
    terminated = status["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 128
    assert terminated["reason"] == "ErrImageNotMapped"
    assert "containerID" not in status["containerStatuses"][0]


def test_merge_conditions_keeps_foreign_conditions() -> None:
    existing = [
        {"type": "DisruptionTarget", "status": "True", "lastTransitionTime": T0},
        {"type": "Ready", "status": "True", "lastTransitionTime": T0},
    ]
    merged = merge_conditions(existing, [("Ready", False, "PodCompleted", None)], T2)
    assert merged[0] == existing[0]
    assert merged[1]["status"] == "False"
    assert merged[1]["lastTransitionTime"] == T2
    assert merged[1]["reason"] == "PodCompleted"


@pytest.mark.parametrize(
    ("content", "tail", "code", "policy", "message"),
    [
        (b"summary", b"log\n", 1, "FallbackToLogsOnError", "summary"),
        (b"", b"log line\n", 1, "FallbackToLogsOnError", "log line\n"),
        (b"", b"log line\n", 0, "FallbackToLogsOnError", ""),
        (b"", b"log line\n", 1, "File", ""),
        (b"x" * 5000, b"", 0, "File", "x" * 4096),
        (b"\xff\xfe", b"", 0, "File", "\ufffd\ufffd"),
    ],
)
def test_termination_message(
    content: bytes, tail: bytes, code: int, policy: str, message: str
) -> None:
    assert termination_message(content, tail, code, policy) == message


def test_termination_file_is_read_up_to_4_kib(tmp_path: Path) -> None:
    path = tmp_path / "termination-log"
    path.write_bytes(b"a" * 10_000)
    assert len(read_termination_file(path)) == 4096
    assert read_termination_file(tmp_path / "missing") == b""


def test_log_tail_is_last_80_lines_then_last_2_kib(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    path.write_bytes(b"".join(f"line {i}\n".encode() for i in range(200)))
    tail = read_log_tail(path)
    lines = tail.decode().splitlines()
    assert len(lines) == 80
    assert lines[0] == "line 120"
    assert lines[-1] == "line 199"
    path.write_bytes(b"".join(b"%03d" % i + b"y" * 96 + b"\n" for i in range(50)))
    tail = read_log_tail(path)
    assert len(tail) == 2048
    assert tail.endswith(b"049" + b"y" * 96 + b"\n")


@pytest.mark.parametrize(
    ("returncode", "code"), [(0, 0), (3, 3), (-15, 143), (-9, 137), (137, 137)]
)
def test_exit_codes(returncode: int, code: int) -> None:
    assert exit_code_of(returncode) == code


@pytest.mark.parametrize(
    ("meta", "spec", "grace"),
    [
        ({}, {}, 30),
        ({"deletionGracePeriodSeconds": 0}, {}, 2),
        ({"deletionGracePeriodSeconds": 10}, {"terminationGracePeriodSeconds": 5}, 5),
        ({"deletionGracePeriodSeconds": 7}, {"terminationGracePeriodSeconds": 60}, 7),
        ({}, {"terminationGracePeriodSeconds": 0}, 2),
    ],
)
def test_grace_seconds(meta: dict[str, Any], spec: dict[str, Any], grace: int) -> None:
    assert grace_seconds({"metadata": meta, "spec": spec}) == grace


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"restartPolicy": "Sometimes", "containers": [{"name": "a"}]}, "'Sometimes' is not one"),
        (
            {"restartPolicy": "Never", "initContainers": [{"name": "i"}], "containers": [{}]},
            "initContainers",
        ),
        (
            {"restartPolicy": "Never", "containers": [{"name": "a"}, {"name": "b"}]},
            "exactly one container per pod, this pod has ['a', 'b']",
        ),
    ],
)
def test_unsupported_pods(spec: dict[str, Any], needle: str) -> None:
    reason = unsupported_reason({"spec": spec})
    assert reason is not None
    assert needle in reason


def test_hostname_is_cut_like_the_kubelet_does() -> None:
    long_name = "a" * 60 + "-b-cccc"
    assert pod_hostname({"metadata": {"name": long_name}, "spec": {}}) == "a" * 60 + "-b"
    assert pod_hostname({"metadata": {"name": "p"}, "spec": {"hostname": "h"}}) == "h"


@pytest.mark.parametrize("policy", ["Never", "OnFailure", "Always"])
def test_supported_pod(policy: str) -> None:
    assert unsupported_reason({"spec": {"restartPolicy": policy, "containers": [{}]}}) is None


@pytest.mark.parametrize(
    ("policy", "code", "restarts", "delay"),
    [
        ("Never", 1, 0, None),
        ("OnFailure", 0, 0, None),
        ("OnFailure", 2, 0, 0.0),
        ("OnFailure", 2, 1, 10.0),
        ("Always", 0, 0, 0.0),
        ("Always", 0, 2, 20.0),
        ("Always", 1, 5, 160.0),
        ("Always", 1, 6, 300.0),
        ("Always", 1, 20, 300.0),
    ],
)
def test_restart_delay_is_crashloop_backoff(
    policy: str, code: int, restarts: int, delay: float | None
) -> None:
    assert restart_delay(policy, code, restarts) == delay


def test_backoff_and_restarted_status_carry_history() -> None:
    pod: dict[str, Any] = {
        "metadata": {"name": "p", "namespace": "n", "uid": "u"},
        "status": {"startTime": T0},
    }
    first = Termination(1, "Error", "", T0, T1, "local://10")
    waiting = backoff_status(pod, INFO, 10, History(1, first), T2)
    assert waiting["phase"] == "Running"
    cs = waiting["containerStatuses"][0]
    assert cs["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    assert cs["state"]["waiting"]["message"] == (
        "back-off 10s restarting failed container=main pod=p_n(u)"
    )
    assert cs["restartCount"] == 1
    assert cs["lastState"]["terminated"]["exitCode"] == 1
    assert conditions(waiting)["Ready"] == "False"
    again = running_status(pod, INFO, 11, T2, T2, history=History(2, first))
    assert again["containerStatuses"][0]["restartCount"] == 2
    assert again["containerStatuses"][0]["lastState"]["terminated"]["containerID"] == "local://10"

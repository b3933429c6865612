"""The runtime of claimed pods: start the container, supervise its process (exits, restarts
with back-off, deadlines, termination with a grace period) and write the pod status at every
step. Which pods to claim or kill is decided in ``kubelet.py``."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from harness.executor.exits import ExitSelector
from harness.executor.launch import Node, admit, prepare
from harness.executor.pod import (
    JSON,
    PodStartError,
    get_int,
    get_map,
    get_text,
    now_rfc3339,
)
from harness.executor.podspec import termination_grace
from harness.executor.processes import main_process, spawn
from harness.executor.reasons import (
    DEADLINE_MESSAGE,
    REASON_DEADLINE,
    REASON_INTERNAL,
    REASON_STOPPED,
)
from harness.executor.restarts import (
    CRASHLOOP_RESET_SECONDS,
    FIRST_RUN,
    History,
    restart_delay,
)
from harness.executor.runs import LaunchPlan, PodRun
from harness.executor.status import (
    ContainerInfo,
    backoff_status,
    claimed_status,
    running_status,
    terminated_status,
)
from harness.executor.status_writes import write_pod_status
from harness.executor.termination import (
    Termination,
    exit_code_of,
    exited_termination,
    lost_termination,
    rejected_termination,
)

log = logging.getLogger("nocturne.executor")

SHUTDOWN_GRACE_SECONDS = 5


class Runtime:
    """Runs claimed pods. Threads: one supervisor (process exits and timers) and a bounded pool
    for API work; ``_lock`` guards ``_runs``, ``_done`` and every ``PodRun``'s fields."""

    def __init__(self, node: Node, *, workers: int) -> None:
        self.node = node
        self._runs: dict[str, PodRun] = {}  # by pod uid
        self._done: set[str] = set()  # uids whose pod this executor has finished with
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="executor-api")
        self._stopping = threading.Event()
        self._exits: ExitSelector[PodRun] = ExitSelector()
        self._supervisor = threading.Thread(target=self._supervise, name="executor-supervisor")

    def _stop_runs(self) -> None:
        """Kill every container (<= 5 s grace), wait for their final status, release the
        threads; ``_stopping`` must be set."""
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            self._terminate(
                run,
                min(run.termination_grace, SHUTDOWN_GRACE_SECONDS),
                REASON_STOPPED,
                "the local pod executor stopped while the container was running",
                force_failed=True,
            )
        self._exits.wake()
        self._supervisor.join(timeout=SHUTDOWN_GRACE_SECONDS + 30)
        self._pool.shutdown(wait=True)
        self._exits.close()

    # ------------------------------------------------------------------ start

    def _start(self, run: PodRun, pod: JSON) -> None:
        with run.status_lock:
            try:
                self._start_locked(run, pod)
            except PodStartError as exc:
                self._reject(run, pod, exc.reason, exc.message)
            except Exception as exc:
                log.exception("%s: cannot run pod", run.key)
                self._reject(
                    run, pod, REASON_INTERNAL, f"the local executor could not run this pod: {exc!r}"
                )

    def _reject(self, run: PodRun, pod: JSON, reason: str, message: str) -> None:
        log.info("%s: failed before start: %s: %s", run.key, reason, message)
        if run.info is None:
            containers = pod.get("spec", {}).get("containers") or [{}]
            first = containers[0] if isinstance(containers[0], dict) else {}
            run.info = ContainerInfo(
                str(first.get("name") or "main"), str(first.get("image") or ""), ""
            )
        if not run.gone:
            self._write_terminated(run, rejected_termination(reason, message, now_rfc3339()))
        self._forget(run)

    def _start_locked(self, run: PodRun, pod: JSON) -> None:
        container, image_key, entry = admit(self.node, run, pod)
        if not self._write_status(
            run, lambda p: claimed_status(p, run.info_or_fail(), now_rfc3339())
        ):
            self._forget(run)
            return
        spec = get_map(pod, "spec")
        claimed_at = time.monotonic()
        run.termination_grace = termination_grace(pod)
        run.restart_policy = get_text(spec, "restartPolicy", "Always")
        run.plan = prepare(self.node, run, pod, container, entry)
        active_deadline = get_int(spec, "activeDeadlineSeconds")
        if active_deadline is not None:
            # The kubelet counts from status.startTime, i.e. from the claim.
            run.deadline = claimed_at + active_deadline
            if time.monotonic() >= run.deadline:
                raise PodStartError(REASON_DEADLINE, DEADLINE_MESSAGE)
        pid = self._launch(run, run.plan, append=False)
        if pid is None:
            self._not_launched(run)
            return
        log.info(
            "%s: started pid %d as uid %d: image %s -> %s",
            run.key,
            pid,
            run.plan.uid,
            image_key,
            run.plan.argv0,
        )
        self._write_running(run, pid, run.history)

    def _launch(self, run: PodRun, plan: LaunchPlan, *, append: bool) -> int | None:
        """Start the sandbox and hand it to the supervisor; None if the pod is stopping."""
        assert run.log_path is not None
        assert run.term_path is not None
        with self._lock:
            run.busy = False
            if run.stopping:
                return None
            run.term_path.write_bytes(b"")  # a new container instance gets a fresh file
            proc = spawn(plan, run.log_path, append=append)
            run.proc = proc
            run.instance += 1
            run.started_at = now_rfc3339()
            run.started_mono = time.monotonic()
            run.pidfd = os.pidfd_open(proc.pid)
            self._exits.add(run.pidfd, run)
        self._exits.wake()
        return proc.pid

    def _not_launched(self, run: PodRun) -> None:
        """The pod began stopping before its (first) container started."""
        if run.gone:
            log.info("%s: deleted before its container started", run.key)
        elif run.stop_reason == REASON_STOPPED:
            # Executor shutdown: leave the pod Pending for the next executor to claim.
            log.info("%s: not started (executor stopping); left Pending", run.key)
            with self._lock:
                self._runs.pop(run.key.uid, None)
            return
        else:
            term = lost_termination(now_rfc3339())
            self._write_terminated(run, run.final(term))
        self._forget(run)

    # ------------------------------------------------------------------ restarts

    def _restart(self, run: PodRun) -> None:
        with run.status_lock:
            with self._lock:
                pending = run.pending
                plan = run.plan
            if pending is None or plan is None:
                return
            if run.stopping:
                with self._lock:
                    run.busy = False
                self._finish_locked(run, run.final(pending), run.history)
                return
            run.history = History(run.history.restart_count + 1, pending)
            try:
                pid = self._launch(run, plan, append=True)
            except PodStartError as exc:
                self._finish_locked(
                    run,
                    run.final(rejected_termination(exc.reason, exc.message, now_rfc3339())),
                    run.history,
                )
                return
            if pid is None:
                self._finish_locked(run, run.final(pending), run.history)
                return
            history = run.history
            log.info("%s: restarted (restart %d) as pid %d", run.key, history.restart_count, pid)
            self._write_running(run, pid, history)

    def _write_backoff(self, run: PodRun, instance: int, delay: float, history: History) -> None:
        with run.status_lock:
            if run.instance != instance or run.stopping or run.gone:
                return  # already restarted or stopping: a newer status supersedes this one
            self._write_status(
                run, lambda p: backoff_status(p, run.info_or_fail(), delay, history, now_rfc3339())
            )

    # ------------------------------------------------------------------ termination

    def _terminate(
        self, run: PodRun, grace: int, reason: str, message: str, *, force_failed: bool = False
    ) -> None:
        """Begin stopping ``run``: SIGTERM now, SIGKILL after ``grace`` seconds (idempotent; an
        earlier kill deadline wins). A pod waiting to restart is finished at once."""
        signal_pid: int | None = None
        finish: Termination | None = None
        with self._lock:
            first = not run.stopping
            if first:
                run.stopping = True
                run.stop_reason, run.stop_message = reason, message
                run.force_failed = force_failed
            if run.alive():
                assert run.proc is not None
                kill_at = time.monotonic() + grace
                if run.kill_at is None or kill_at < run.kill_at:
                    run.kill_at = kill_at
                if first:
                    signal_pid = run.proc.pid
            elif first and not run.busy and run.restart_at is not None and run.pending:
                run.restart_at = None
                finish = run.final(run.pending)
        if signal_pid is not None:
            target = main_process(signal_pid)
            log.info(
                "%s: SIGTERM to pid %s, SIGKILL in %d s%s",
                run.key,
                target or signal_pid,
                grace,
                f" ({reason})" if reason else "",
            )
            with contextlib.suppress(ProcessLookupError):
                if target is not None:
                    os.kill(target, signal.SIGTERM)
                else:
                    # Not exec'd yet: nothing graceful is possible.
                    os.killpg(signal_pid, signal.SIGKILL)
        if finish is not None:
            log.info("%s: stopping while in back-off; finishing", run.key)
            self._pool.submit(self._finish, run, finish, run.history)
        self._exits.wake()

    # ------------------------------------------------------------------ supervision

    def _supervise(self) -> None:
        """Reap exited containers and fire deadline/restart/SIGKILL timers until shutdown."""
        while True:
            with self._lock:
                runs = list(self._runs.values())
                if self._stopping.is_set() and not runs:
                    return
            now = time.monotonic()
            timers = [
                t for r in runs for t in (r.deadline, r.kill_at, r.restart_at) if t is not None
            ]
            timeout = min([1.0, *(max(0.0, t - now) for t in timers)])
            for run in self._exits.wait(timeout):
                self._reap(run)
            self._fire_timers(runs, time.monotonic())

    def _fire_timers(self, runs: Sequence[PodRun], now: float) -> None:
        for run in runs:
            if run.alive() and run.kill_at is not None and now >= run.kill_at:
                assert run.proc is not None
                log.info("%s: grace period over; SIGKILL", run.key)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(run.proc.pid, signal.SIGKILL)
                run.kill_at = now + 5.0  # retry if it somehow survives
            elif not run.stopping and run.deadline is not None and now >= run.deadline:
                self._terminate(
                    run,
                    run.termination_grace,
                    REASON_DEADLINE,
                    DEADLINE_MESSAGE,
                    force_failed=True,
                )
            elif run.restart_at is not None and now >= run.restart_at:
                with self._lock:
                    if run.stopping or run.restart_at is None:
                        continue
                    run.restart_at = None
                    run.busy = True
                self._pool.submit(self._restart, run)

    def _reap(self, run: PodRun) -> None:
        proc = run.proc
        if proc is None or proc.poll() is None:
            return
        if run.pidfd is not None:
            self._exits.remove(run.pidfd)
            run.pidfd = None
        # The PID namespace dies with bwrap, but a setsid'd process could still hold the
        # process group: make sure nothing of this container survives.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        code = exit_code_of(proc.returncode)
        assert run.term_path is not None
        assert run.log_path is not None
        term = exited_termination(
            code,
            term_path=run.term_path,
            log_path=run.log_path,
            message_policy=run.message_policy,
            started_at=run.started_at,
            pid=proc.pid,
        )
        with self._lock:
            if time.monotonic() - run.started_mono > CRASHLOOP_RESET_SECONDS:
                run.backoff_level = 0  # the kubelet forgets back-off after a long healthy run
            delay = (
                None if run.stopping else restart_delay(run.restart_policy, code, run.backoff_level)
            )
            if delay is not None:
                run.pending = term
                run.backoff_level += 1
                if delay == 0:
                    run.busy = True
                else:
                    run.restart_at = time.monotonic() + delay
            instance, history = run.instance, run.history
        log.info(
            "%s: container exited with code %d%s",
            run.key,
            code,
            "" if delay is None else f"; restart in {delay:.0f} s ({run.restart_policy})",
        )
        if delay is None:
            self._pool.submit(self._finish, run, run.final(term), history)
        elif delay == 0:
            self._pool.submit(self._restart, run)
        else:
            waiting = History(history.restart_count, term)
            self._pool.submit(self._write_backoff, run, instance, delay, waiting)

    # ------------------------------------------------------------------ finish

    def _finish(self, run: PodRun, term: Termination, history: History) -> None:
        with run.status_lock:
            self._finish_locked(run, term, history)

    def _finish_locked(self, run: PodRun, term: Termination, history: History) -> None:
        if run.gone:
            log.info("%s: pod object is gone; no final status to write", run.key)
        else:
            self._write_terminated(run, term, history)
        shutil.rmtree(run.private_dir, ignore_errors=True)  # secrets do not linger
        self._forget(run)

    def _forget(self, run: PodRun) -> None:
        with self._lock:
            self._runs.pop(run.key.uid, None)
            if not run.gone:
                self._done.add(run.key.uid)
        self._exits.wake()

    # ------------------------------------------------------------------ status writes

    def _write_status(self, run: PodRun, build: Callable[[JSON], JSON]) -> bool:
        """``write_pod_status`` for ``run``; less patient once the executor is stopping."""
        give_up_after = 15.0 if self._stopping.is_set() else 120.0
        return write_pod_status(self.node.api, run.key, build, give_up_after=give_up_after)

    def _write_running(self, run: PodRun, pid: int, history: History) -> None:
        self._write_status(
            run,
            lambda p: running_status(
                p, run.info_or_fail(), pid, run.started_at, now_rfc3339(), history=history
            ),
        )

    def _write_terminated(
        self,
        run: PodRun,
        term: Termination,
        history: History = FIRST_RUN,
    ) -> None:
        info = run.info_or_fail()
        phase = "Succeeded" if term.exit_code == 0 and not term.force_failed else "Failed"
        if self._write_status(run, lambda p: terminated_status(p, info, term, history)):
            log.info(
                "%s: phase %s (exit code %d, reason %s)",
                run.key,
                phase,
                term.exit_code,
                term.pod_reason or term.reason,
            )

"""The ``nocturne`` command line: offline checks for CI pipelines (``validate``, ``next-runs``) and
day-to-day control of a schedule in the cluster (``pause``, ``resume``, ``run``, ``cancel``), and
its runs (``runs``, ``show``, ``watch``, ``cost``, ``describe``)."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import yaml
from kubernetes import config

from nocturne_operator.adapters.kube import Kube
from nocturne_operator.api import conditions as cond
from nocturne_operator.api.model import API_VERSION, KIND
from nocturne_operator.api.policy import POLICY_KIND
from nocturne_operator.cli import reports, watch
from nocturne_operator.cli.apiruns import ApiRuns
from nocturne_operator.controller.reconcile import (
    ANNOTATION_CANCEL,
    ANNOTATION_RESUME,
    ANNOTATION_RESUME_REASON,
    ANNOTATION_RUN_NOW,
    ANNOTATION_SUSPEND_REASON,
)
from nocturne_operator.errors import SettingsError
from nocturne_operator.prices import PriceTableError, load_price_table
from nocturne_operator.render import LABEL_SCHEDULE
from nocturne_operator.runs.verdicts import cancellable
from nocturne_operator.schedule import cron
from nocturne_operator.schedule.policy import Policy, limits_for
from nocturne_operator.schedule.validation import iana_zone, validate
from nocturne_operator.settings import Settings, load_settings
from nocturne_operator.storage import ExecutionRecord, History, HistoryError, redact_url, upgrade

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2
# Manifests come from strangers' pull requests: a bound on what is read, and no YAML aliases (a
# "billion laughs" file of a few hundred bytes expands to gigabytes).
MAX_FILE_BYTES = 8 * 1024 * 1024


class _NoAliasLoader(yaml.SafeLoader):
    """The safe loader, refusing aliases before anything is expanded."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event: Any = self.peek_event()  # type: ignore[no-untyped-call]
            line = event.start_mark.line + 1
            raise _ManifestError(
                f"anchors and aliases (&, *) are not accepted in manifests, line {line}"
            )
        return super().compose_node(parent, index)


class _ManifestError(ValueError):
    """A file refused before or while its YAML is read; the message is for people."""


def _read(path: Path) -> list[Any]:
    """The YAML documents of ``path`` ('-': stdin); _ManifestError says why not."""
    try:
        if str(path) == "-":
            data = sys.stdin.buffer.read(MAX_FILE_BYTES + 1)
        else:
            with path.open("rb") as stream:
                data = stream.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise _ManifestError(exc.strerror or str(exc)) from None
    if len(data) > MAX_FILE_BYTES:
        raise _ManifestError(f"larger than {MAX_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _ManifestError(
            f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None
    try:
        return list(yaml.load_all(text, Loader=_NoAliasLoader))
    except yaml.YAMLError as exc:
        raise _ManifestError(str(exc).replace("\n", " ")) from None
    except RecursionError:
        raise _ManifestError("nested too deeply") from None
    except ValueError as exc:  # e.g. a timestamp such as 2026-02-30
        raise _ManifestError(str(exc)) from None


def _kind_error(doc: dict[str, Any]) -> str | None:
    """Why a document that is not an AgentSchedule was probably meant to be one, else None
    (other kinds in the same file are skipped)."""
    kind = doc.get("kind")
    if not isinstance(kind, str) or not kind:
        return "kind: required (kubectl refuses a document without one)"
    if kind == POLICY_KIND:
        return None
    group = str(doc.get("apiVersion", "")).rpartition("/")[0]
    near = difflib.SequenceMatcher(None, kind.lower(), KIND.lower()).ratio() >= 0.8
    if group == API_VERSION.partition("/")[0] or near:
        return f"kind {kind!r}: unknown kind; did you mean {KIND}?"
    return None


def _documents(
    path: Path, read: list[Any] | _ManifestError | None = None
) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    """(label, AgentSchedule document or None, error) for each YAML document in ``path`` (or
    in ``read``, its documents read before)."""
    try:
        docs = _read(path) if read is None else read
        if isinstance(docs, _ManifestError):
            raise docs
    except _ManifestError as exc:
        yield str(path), None, f"cannot read YAML: {exc}"
        return
    for position, doc in enumerate(docs, start=1):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            yield f"{path}#{position}", None, "document is not a mapping"
            continue
        if doc.get("kind") != KIND:
            error = _kind_error(doc)
            if error is not None:
                yield f"{path}#{position}", None, error
            continue
        metadata = doc.get("metadata")
        name = metadata.get("name") if isinstance(metadata, dict) else None
        label = f"{path}: {KIND}/{name if name else f'#{position}'}"
        if doc.get("apiVersion") != API_VERSION:
            yield label, None, f"apiVersion {doc.get('apiVersion')!r}: expected {API_VERSION!r}"
            continue
        yield label, doc, None


# The label the apiserver puts on every namespace: the one way to select it by name.
NAME_LABEL = "kubernetes.io/metadata.name"


def _namespace_labels(text: str | None) -> dict[str, str] | None:
    """``--namespace-labels team=sre,tier=fast`` as a mapping (None when not given)."""
    if text is None:
        return None
    labels: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--namespace-labels {text!r}: {pair!r} is not key=value")
        labels[key] = value
    return labels


def _policies_and_namespaces(
    files: Mapping[Path, list[Any] | _ManifestError],
) -> tuple[list[Policy], dict[str, dict[str, str]], list[str]]:
    """The AgentSchedulePolicies and Namespaces among the manifests (a GitOps repository holds
    them next to the schedules), and the errors of the policies that are broken."""
    policies: list[Policy] = []
    namespaces: dict[str, dict[str, str]] = {}
    errors: list[str] = []
    for path, docs in files.items():
        if isinstance(docs, _ManifestError):
            continue
        for doc in docs:
            if not isinstance(doc, dict) or not isinstance(doc.get("metadata"), dict):
                continue
            name = str(doc["metadata"].get("name") or "")
            if doc.get("kind") == POLICY_KIND:
                policy = Policy.parse(name, doc.get("spec"))
                policies.append(policy)
                errors.extend(f"{path}: {POLICY_KIND}/{name}: {e}" for e in policy.errors)
            elif doc.get("kind") == "Namespace" and doc.get("apiVersion") == "v1":
                labels = doc["metadata"].get("labels") or {}
                if isinstance(labels, dict):
                    namespaces[name] = {
                        **{str(k): str(v) for k, v in labels.items()},
                        NAME_LABEL: name,  # the apiserver sets it on every namespace
                    }
    return policies, namespaces, errors


def _read_or_error(path: Path) -> list[Any] | _ManifestError:
    """The YAML documents of ``path``, or why they cannot be read."""
    try:
        return _read(path)
    except _ManifestError as exc:
        return exc


def _labels_of(
    label: str,
    doc: Mapping[str, Any],
    namespaces: Mapping[str, dict[str, str]],
    given: dict[str, str] | None,
) -> dict[str, str]:
    """The labels of the namespace ``doc`` names: its Namespace manifest's, else those given
    on the command line (with the name label the apiserver sets); a warning when unknown."""
    metadata = doc.get("metadata")
    namespace = str(metadata.get("namespace") or "") if isinstance(metadata, Mapping) else ""
    known = namespaces.get(namespace)
    if known is not None:
        return known
    if given is None:
        _say(
            f"{label}: warning: the labels of namespace {namespace or '(none)'} are unknown (no "
            "Namespace manifest, no --namespace-labels): policies selecting by other labels "
            "are not applied",
            file=sys.stderr,
        )
    return {**(given or {}), **({NAME_LABEL: namespace} if namespace else {})}


def cmd_validate(args: argparse.Namespace, settings: Settings) -> int:
    """One line per error; exit 1 when any schedule (or policy) is invalid. AgentSchedulePolicies
    in the files apply to the schedules as in the cluster: to the namespace a schedule names, by
    that Namespace's labels when it is among the files, else by ``--namespace-labels``."""
    now = datetime.now(UTC)
    try:
        prices = load_price_table(settings.price_table_file)
        given_labels = _namespace_labels(args.namespace_labels)
    except (PriceTableError, ValueError) as exc:
        _say(exc)
        return EXIT_USAGE
    files = {path: _read_or_error(path) for path in map(Path, args.files)}
    policies, namespaces, policy_errors = _policies_and_namespaces(files)
    for broken in policy_errors:
        _say(broken)
    failed = len(policy_errors)
    checked = 0
    for path, read in files.items():
        for label, doc, error in _documents(path, read):
            if doc is None:
                _say(f"{label}: {error}")
                failed += 1
                continue
            checked += 1
            labels = _labels_of(label, doc, namespaces, given_labels) if policies else None
            limits = limits_for(settings, policies, labels) if policies else None
            result = validate(doc, settings, now=now, prices=prices, limits=limits)
            for problem in result.errors:
                _say(f"{label}: {problem}")
            for warning in result.warnings:
                _say(f"{label}: warning: {warning}", file=sys.stderr)
            if not result.ok:
                failed += 1
            elif not args.quiet:
                _say(f"{label}: valid")
    if checked == 0 and failed == 0 and not policies:
        _say(f"no {KIND} documents found in {', '.join(args.files)}")
        return EXIT_INVALID
    return EXIT_INVALID if failed else EXIT_OK


def cmd_next_runs(args: argparse.Namespace, settings: Settings) -> int:
    """The next N fire times, exactly as the CronJob controller will fire them."""
    after = datetime.fromisoformat(args.after) if args.after else datetime.now(UTC)
    if after.tzinfo is None:
        print(f"--after {args.after!r}: needs a UTC offset, e.g. 2026-03-08T00:00:00-05:00")
        return EXIT_USAGE
    output: list[dict[str, Any]] = []
    status = EXIT_OK
    for path in args.files:
        for label, doc, error in _documents(Path(path)):
            if doc is None:
                _say(f"{label}: {error}")
                status = EXIT_INVALID
                continue
            result = validate(doc, settings, now=after)
            if result.spec is None:
                for problem in result.errors:
                    _say(f"{label}: {problem}")
                status = EXIT_INVALID
                continue
            zone = ZoneInfo(result.spec.time_zone)
            schedule = cron.parse_schedule(result.spec.schedule)
            runs = [
                cron.describe_run(t, zone)
                for t in cron.next_fire_times(schedule, zone, after, args.count)
            ]
            output.append(
                {
                    "name": doc["metadata"].get("name"),
                    "schedule": result.spec.schedule,
                    "timeZone": result.spec.time_zone,
                    "runs": [{"utc": r.utc, "local": r.local} for r in runs],
                }
            )
    if args.output == "json":
        print(json.dumps(output, indent=2))
    else:
        for item in output:
            _say(f"{item['name']}  {item['schedule']!r}  {item['timeZone']}")
            for run in item["runs"]:
                print(f"  {run['utc']}  {run['local']}")
    return status


def cmd_control(args: argparse.Namespace, settings: Settings) -> int:
    """pause / resume / run / cancel: patch the AgentSchedule; the operator does the rest."""
    kube = Kube.connect()
    namespace = args.namespace or _current_namespace()
    body = kube.get(KIND, namespace, args.name)
    if body is None:
        _say(f"{KIND} {namespace}/{args.name} not found")
        return EXIT_INVALID
    patch: dict[str, Any]
    if args.command in ("pause", "resume"):
        unchanged = _already(args.command, body)
        if unchanged is not None:  # pausing twice or resuming twice changes nothing
            _say(f"{args.command}: {namespace}/{args.name} {unchanged}; nothing changed")
            return EXIT_OK
    if args.command == "pause":
        patch = {
            "metadata": {
                "annotations": {
                    ANNOTATION_SUSPEND_REASON: args.reason,
                    ANNOTATION_RESUME_REASON: None,
                }
            },
            "spec": {"suspend": True},
        }
    elif args.command == "resume":
        # The resume request also restarts the failure count and lifts an auto-pause, which
        # then starts one verification run at once.
        patch = {
            "metadata": {
                "annotations": {
                    ANNOTATION_SUSPEND_REASON: None,
                    ANNOTATION_RESUME: uuid.uuid4().hex[:12],
                    ANNOTATION_RESUME_REASON: args.reason,
                }
            },
            "spec": {"suspend": False},
        }
    elif args.command == "cancel":
        running = cancellable(kube.list_objects("Job", namespace, f"{LABEL_SCHEDULE}={args.name}"))
        if not running:  # cancelling twice, or after the run ended, changes nothing
            _say(f"cancel: {namespace}/{args.name} has no active run; nothing changed")
            return EXIT_OK
        # The operator deletes the Jobs (and says so in an Event and the audit trail).
        request = uuid.uuid4().hex[:12]
        patch = {"metadata": {"annotations": {ANNOTATION_CANCEL: request}}}
        _say(f"cancel: {namespace}/{args.name}: Job {', '.join(running)} to be cancelled")
    else:
        request = args.request_id or uuid.uuid4().hex[:12]
        patch = {"metadata": {"annotations": {ANNOTATION_RUN_NOW: request}}}
    kube.merge_patch(KIND, namespace, args.name, patch)
    _say(f"{args.command}: {namespace}/{args.name} patched")
    return EXIT_OK


def _already(command: str, body: Mapping[str, Any]) -> str | None:
    """Why ``pause`` or ``resume`` has nothing to do on ``body`` (None: it has)."""
    spec, status = body.get("spec") or {}, body.get("status") or {}
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    if command == "pause":
        if not spec.get("suspend"):
            return None
        reason = annotations.get(ANNOTATION_SUSPEND_REASON) or "spec.suspend is true"
        return f"is already paused ({reason})"
    if spec.get("suspend") or status.get("autoPause"):
        return None
    held = next(
        (
            c
            for c in status.get("conditions") or []
            if c.get("type") == cond.BUDGET_EXHAUSTED and c.get("status") == "True"
        ),
        None,
    )
    if held is not None:
        return (
            f"is not paused but held by its budget ({held.get('message')}); a resume does not "
            "lift a budget hold"
        )
    return "is not paused"


def cmd_db_upgrade(args: argparse.Namespace, _settings: Settings) -> int:
    """Apply the history schema's migrations (the Helm hook Job runs this before the operator)."""
    try:
        url = _database_url(args)
    except ValueError as exc:
        print(f"db upgrade: {exc}")
        return EXIT_USAGE
    try:
        upgrade(url)
    except HistoryError as exc:
        _say(f"db upgrade failed: {exc}")
        return EXIT_INVALID
    _say(f"db upgrade: {redact_url(url)} is at the latest schema")
    return EXIT_OK


def cmd_db_stats(args: argparse.Namespace, settings: Settings) -> int:
    """Rows, size and oldest row of each history table, with the retention settings."""
    try:
        url = _database_url(args)
    except ValueError as exc:
        _say(f"db stats: {exc}")
        return EXIT_USAGE
    try:
        with History.connect(url) as store:
            tables = store.table_stats()
    except HistoryError as exc:
        _say(f"db stats: {exc}")
        return EXIT_INVALID
    print(reports.db_stats_report(tables, settings, args.output))
    return EXIT_OK


def _configured_url(args: argparse.Namespace) -> str:
    """--database-url, else $NOCTURNE_DATABASE_URL ("" when neither is set)."""
    url: str = args.database_url or os.environ.get("NOCTURNE_DATABASE_URL", "")
    return url


def _database_url(args: argparse.Namespace) -> str:
    url = _configured_url(args)
    if not url:
        raise ValueError("no database URL (set NOCTURNE_DATABASE_URL or --database-url)")
    return url


def _runs(args: argparse.Namespace, namespace: str) -> AbstractContextManager[Any]:
    """Where a report reads runs: PostgreSQL with a database URL (administrators), else the
    agentruns API with the user's kubeconfig and RBAC."""
    url = _configured_url(args)
    if url:
        return History.connect(url)
    return ApiRuns(Kube.connect(), namespace, args.name)


def cmd_history(args: argparse.Namespace, _settings: Settings) -> int:
    """Runs of a schedule, newest first, paginated."""
    try:
        since = reports.parse_time(args.since, "--since")
        until = reports.parse_time(args.until, "--until")
        statuses = reports.parse_statuses(args.status)
    except ValueError as exc:
        _say(exc)
        return EXIT_USAGE
    namespace = args.namespace or _current_namespace()
    try:
        with _runs(args, namespace) as store:
            print(
                reports.history_report(
                    store,
                    namespace,
                    args.name,
                    since=since,
                    until=until,
                    statuses=statuses,
                    limit=args.limit,
                    before_id=args.before_id,
                    output=args.output,
                )
            )
    except HistoryError as exc:
        _say(f"history: {exc}")
        return EXIT_INVALID
    return EXIT_OK


def cmd_cost(args: argparse.Namespace, _settings: Settings) -> int:
    """Cost per day, week or month in the schedule's (or a given) time zone."""
    try:
        since = reports.parse_time(args.since, "--since")
        until = reports.parse_time(args.until, "--until")
    except ValueError as exc:
        _say(exc)
        return EXIT_USAGE
    if iana_zone(args.tz) is None:
        _say(f"--tz {args.tz!r}: not an IANA zone")
        return EXIT_USAGE
    namespace = args.namespace or _current_namespace()
    try:
        with _runs(args, namespace) as store:
            periods = store.cost(
                namespace, args.name, since=since, until=until, by=args.by, tz=args.tz
            )
    except HistoryError as exc:
        _say(f"cost: {exc}")
        return EXIT_INVALID
    print(reports.cost_report(periods, args.by, args.output))
    return EXIT_OK


def cmd_show(args: argparse.Namespace, _settings: Settings) -> int:
    """One run of a schedule, its output included."""
    namespace = args.namespace or _current_namespace()
    try:
        with _runs(args, namespace) as store:
            run = _one_run(store, namespace, args.name, args.run)
    except HistoryError as exc:
        _say(f"show: {exc}")
        return EXIT_INVALID
    if run is None:
        which = f"run {args.run!r}" if args.run else "a run"
        _say(f"show: {namespace}/{args.name} has no {which} in history")
        return EXIT_INVALID
    _print_run(run, args.output)
    return EXIT_OK


def _print_run(run: ExecutionRecord, how: str) -> None:
    """A run as ``show`` prints it: JSON, rendered in a terminal, or its output alone piped."""
    if how == "json":
        print(json.dumps(reports.run_json(run), indent=2))
        return
    output = reports.printable_block(run.output) if run.output else None
    if sys.stdout.isatty():
        for line in reports.run_header(run):
            print(line)
        print()
        if output is None:
            print("(no output)")
        else:
            from rich.console import Console  # noqa: PLC0415 - only for a terminal
            from rich.markdown import Markdown  # noqa: PLC0415

            Console().print(Markdown(output))
        return
    # Piped: the output alone on stdout, so that `> digest.md` holds the digest.
    for line in reports.run_header(run):
        print(line, file=sys.stderr)
    if output is None:
        print("(no output)", file=sys.stderr)
    else:
        print(output)


def cmd_watch(args: argparse.Namespace, _settings: Settings) -> int:
    """Follow the schedule's run in flight to its end, then print it as ``show`` does (with a
    history database) or its result from status. 0 when the run succeeded."""
    namespace = args.namespace or _current_namespace()
    kube = Kube.connect()

    def waiting(body: Mapping[str, Any]) -> None:
        nxt = (body.get("status") or {}).get("nextRunLocal") or "not scheduled"
        _say(
            f"{namespace}/{args.name}: no run in flight; waiting (next run: {nxt}), Ctrl-C to stop"
        )

    try:
        followed = watch.follow(
            lambda: kube.get(KIND, namespace, args.name),
            out=sys.stdout,
            interactive=sys.stdout.isatty(),
            wait=not args.no_wait,
            interval=args.interval,
            on_waiting=waiting,
            job_ended=lambda job: _job_ended(kube, namespace, job),
        )
    except KeyboardInterrupt:
        return EXIT_INVALID
    if followed.gone:
        _say(f"{KIND} {namespace}/{args.name} is gone")
        return EXIT_INVALID
    if followed.job is None:
        _say(f"{namespace}/{args.name}: no run in flight")
        return EXIT_INVALID
    last = followed.last_run
    if last is None:
        _say(f"{namespace}/{args.name}: Job {followed.job} ended; its result is not on status yet")
        return EXIT_INVALID
    _say(
        f"{followed.job}: {last.get('result')}, {last.get('costUSD')} USD"
        + (f": {last['message']}" if last.get("message") else ""),
        file=sys.stderr,
    )
    try:
        with _runs(args, namespace) as store:
            run = _one_run(store, namespace, args.name, followed.job)
    except HistoryError as exc:
        _say(f"(history unavailable: {exc})", file=sys.stderr)
        hint = f"nocturne show {args.name} {followed.job} -n {namespace}"
        _say(f"(its output: {hint})", file=sys.stderr)
    else:
        if run is not None:
            _print_run(run, "text")
    return EXIT_OK if last.get("result") == "Succeeded" else EXIT_INVALID


def _job_ended(kube: Kube, namespace: str, job: str) -> bool:
    """The Job finished (Complete or Failed: no retry follows) or is gone."""
    found = kube.get("Job", namespace, job)
    if found is None:
        return True
    return any(
        c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
        for c in (found.get("status") or {}).get("conditions") or []
    )


def _one_run(
    store: History | ApiRuns, namespace: str, name: str, run: str | None
) -> ExecutionRecord | None:
    """The newest run, the run with that id, or the newest attempt of that Job."""
    if run is not None and run.isdigit():
        found = store.get(int(run))
        if found is None or (found.namespace, found.schedule_name) != (namespace, name):
            return None
        return found
    runs = store.runs(namespace, name, limit=1, include_output=True, job_name=run)
    return runs[0] if runs else None


def cmd_describe(args: argparse.Namespace, _settings: Settings) -> int:
    """The schedule from the cluster plus its last runs from PostgreSQL (when reachable)."""
    namespace = args.namespace or _current_namespace()
    obj = Kube.connect().get(KIND, namespace, args.name)
    if obj is None:
        _say(f"{KIND} {namespace}/{args.name} not found")
        return EXIT_INVALID
    runs: list[ExecutionRecord] = []
    try:  # optional here: describe works without history
        with _runs(args, namespace) as store:
            runs = store.runs(namespace, args.name, limit=5)
    except HistoryError as exc:
        _say(f"(history unavailable: {exc})")
    print(reports.describe(obj, runs))
    return EXIT_OK


def _say(text: object, *, file: Any = None) -> None:
    """Print one line for people: control characters from stored or hostile texts are shown as
    escapes, never sent to the terminal."""
    print(reports.printable(text), file=file)


def _current_namespace() -> str:
    try:
        _, context = config.list_kube_config_contexts()
        return str(context.get("context", {}).get("namespace") or "default")
    except (config.ConfigException, OSError):
        return "default"


def _add_report_parsers(sub: Any) -> None:
    """history, cost and describe: read PostgreSQL (and the cluster for describe)."""
    schedule = argparse.ArgumentParser(add_help=False)
    schedule.add_argument("name")
    schedule.add_argument("-n", "--namespace")
    schedule.add_argument("--database-url", help="default: $NOCTURNE_DATABASE_URL")
    hist = sub.add_parser(
        "history", aliases=["runs"], parents=[schedule], help="runs of a schedule, newest first"
    )
    hist.add_argument("--since", help="ISO 8601 date or time (UTC unless an offset is given)")
    hist.add_argument("--until")
    hist.add_argument("--status", action="append", help="repeatable, e.g. --status FAILED")
    hist.add_argument("--limit", type=int, default=50, choices=range(1, 1001), metavar="N")
    hist.add_argument("--before-id", type=int, help="next page: the last id of the previous")
    hist.add_argument("-o", "--output", choices=["table", "json"], default="table")
    hist.set_defaults(func=cmd_history)
    show = sub.add_parser(
        "show",
        parents=[schedule],
        help="one run: its output, alert, refused operations, cost and timings",
        description="One run (the newest by default). In a terminal its output is rendered "
        "(markdown); piped, only the output goes to stdout (nocturne show NAME > digest.md) "
        "and the rest to stderr.",
    )
    show.add_argument("run", nargs="?", help="a Job name or a run id (default: the newest run)")
    show.add_argument("-o", "--output", choices=["text", "json"], default="text")
    show.set_defaults(func=cmd_show)
    follow = sub.add_parser(
        "watch",
        parents=[schedule],
        help="follow the run in flight (steps, budget, activity) and print it when it ends",
        description="Follows status.activeRun live (a terminal) or one line per change "
        "(piped), waiting for a run to start unless --no-wait; then prints the run as show "
        "does (with a history database) or its result. Exit 0 when the run succeeded.",
    )
    follow.add_argument("--no-wait", action="store_true", help="exit 1 if no run is in flight")
    follow.add_argument(
        "--interval", type=float, default=1.0, help="seconds between reads (default 1)"
    )
    follow.set_defaults(func=cmd_watch)
    cost = sub.add_parser(
        "cost", parents=[schedule], help="cost of a schedule per day, week or month"
    )
    cost.add_argument("--since")
    cost.add_argument("--until")
    cost.add_argument("--by", choices=["day", "week", "month"], default="day")
    cost.add_argument("--tz", default="UTC", help="IANA zone the periods are cut in")
    cost.add_argument("-o", "--output", choices=["table", "json"], default="table")
    cost.set_defaults(func=cmd_cost)
    desc = sub.add_parser(
        "describe", parents=[schedule], help="schedule, next runs, last runs, cost, conditions"
    )
    desc.set_defaults(func=cmd_describe)


def _parser(prog: str = "nocturne") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--config", type=Path, help="operator settings file (YAML)")
    parser.add_argument("--min-interval-minutes", type=int)
    parser.add_argument("--max-per-run-usd")
    parser.add_argument("--max-schedules-per-namespace", type=int)
    sub = parser.add_subparsers(dest="command", required=True)
    val = sub.add_parser("validate", help="validate AgentSchedule manifests offline")
    val.add_argument("files", nargs="+", help="YAML files ('-' for stdin)")
    val.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    val.add_argument(
        "--namespace-labels",
        metavar="K=V,...",
        help="labels of the schedules' namespace, for the AgentSchedulePolicies in the files "
        "(a Namespace manifest among the files gives its own)",
    )
    val.set_defaults(func=cmd_validate)
    nxt = sub.add_parser("next-runs", help="print the next fire times of AgentSchedules")
    nxt.add_argument("files", nargs="+")
    nxt.add_argument("--count", type=int, default=5, choices=range(1, 101), metavar="N")
    nxt.add_argument("--after", help="start time (ISO 8601 with offset); default now")
    nxt.add_argument("-o", "--output", choices=["table", "json"], default="table")
    nxt.set_defaults(func=cmd_next_runs)
    _add_report_parsers(sub)
    db = sub.add_parser("db", help="manage the history database")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    up = db_sub.add_parser("upgrade", help="apply schema migrations (idempotent, safe in parallel)")
    up.add_argument("--database-url", help="default: $NOCTURNE_DATABASE_URL (keep it in a Secret)")
    up.set_defaults(func=cmd_db_upgrade)
    stats = db_sub.add_parser(
        "stats", help="rows, size and oldest row of each table, and how long rows are kept"
    )
    stats.add_argument("--database-url", help="default: $NOCTURNE_DATABASE_URL")
    stats.add_argument("-o", "--output", choices=["table", "json"], default="table")
    stats.set_defaults(func=cmd_db_stats)
    for name, text in (
        ("pause", "suspend a schedule"),
        ("resume", "resume a schedule"),
        ("run", "start one run now"),
        ("cancel", "stop the active run (it ends CANCELLED with the cost so far)"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("name")
        cmd.add_argument("-n", "--namespace")
        if name == "pause":
            cmd.add_argument("--reason", required=True, help="why (shown on the condition)")
        if name == "resume":
            cmd.add_argument("--reason", help="why (on the Resumed Event and in the audit trail)")
        if name == "run":
            cmd.add_argument("--request-id", help="idempotency key (default: random)")
        cmd.set_defaults(func=cmd_control)
    return parser


def kubectl_plugin() -> int:
    """Entry point of ``kubectl-nocturne``: on the PATH, ``kubectl nocturne ...`` runs it
    (kubectl hands over its arguments and environment, KUBECONFIG included)."""
    return main(prog="kubectl nocturne")


def main(argv: Sequence[str] | None = None, *, prog: str = "nocturne") -> int:
    """Entry point of the ``nocturne`` console script."""
    args = _parser(prog).parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.min_interval_minutes is not None:
        overrides["min_interval_minutes"] = args.min_interval_minutes
    if args.max_schedules_per_namespace is not None:
        overrides["max_schedules_per_namespace"] = args.max_schedules_per_namespace
    if args.max_per_run_usd is not None:
        try:
            overrides["max_per_run_usd"] = Decimal(args.max_per_run_usd)
        except InvalidOperation:
            print(f"--max-per-run-usd {args.max_per_run_usd!r}: not a decimal number")
            return EXIT_USAGE
    try:
        settings = load_settings(args.config, **overrides)
    except SettingsError as exc:
        _say(exc)
        return EXIT_USAGE
    status: int = args.func(args, settings)
    return status


if __name__ == "__main__":
    sys.exit(main())

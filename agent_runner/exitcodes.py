"""The runner's exit-code contract, which the operator's ``podFailurePolicy`` relies on.

Keep in step with ``docs/schedule-reference.md``. The operator renders ``NON_RETRYABLE`` into
every Job's ``podFailurePolicy`` from this module (it may import the runner's contract modules,
never its agent), so there is no second copy to keep in step.
"""

from __future__ import annotations

from typing import ClassVar

SUCCEEDED = 0
TRANSIENT = 1  # retried within the Job's backoffLimit
CONFIG_ERROR = 3  # fails the Job at once: a retry cannot help
BUDGET_EXHAUSTED = 4  # fails the Job at once: retries share the run's budget
NON_RETRYABLE = (CONFIG_ERROR, BUDGET_EXHAUSTED)


class RunnerError(Exception):
    """Base of the runner's own errors; ``exit_code`` is what the process exits with."""

    exit_code: ClassVar[int] = TRANSIENT

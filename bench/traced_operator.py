"""``python -m nocturne_operator`` under tracemalloc, for ``operator_scale.py --trace-memory``.

On SIGUSR1 it writes what the operator holds live (not what RSS keeps from freed peaks) to
``$NOCTURNE_TRACE_MEMORY_DIR/<n>.txt``: the total, then the top allocation sites by file and
by line. Tracing costs the operator time and memory: figures of a traced run are not the
bench's figures."""

from __future__ import annotations

import itertools
import os
import runpy
import signal
import tracemalloc
from pathlib import Path
from types import FrameType

OUT = Path(os.environ.get("NOCTURNE_TRACE_MEMORY_DIR", "."))
TOP = 40
_dumps = itertools.count()


def dump(_signum: int, _frame: FrameType | None) -> None:
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )
    lines = [f"live: {sum(s.size for s in snapshot.statistics('filename')) / 2**20:.1f} MiB"]
    for group in ("filename", "lineno"):
        lines.append(f"-- by {group} --")
        lines += [str(stat) for stat in snapshot.statistics(group)[:TOP]]
    path = OUT / f"{next(_dumps)}.txt"
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    tracemalloc.start(1)
    signal.signal(signal.SIGUSR1, dump)
    runpy.run_module("nocturne_operator", run_name="__main__", alter_sys=True)

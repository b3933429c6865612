"""Measure the local control plane: warm start time per component and resident memory.

Run: PYTHONSAFEPATH=1 PYTHONPATH=tests .venv/bin/python bench/control_plane_start.py [runs]
Prints figures only. The baseline measured in the same run is a bare process start of the same
115 MiB binary (`kube-local version`), so the ratios show how much of a start is real work.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import build, controlplane


def rss_mib(pid: int) -> float:
    """Resident set size of a process in MiB (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main(runs: int) -> None:
    binary = build.ensure()
    baseline = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([str(binary), "version"], check=True, capture_output=True)
        baseline.append(time.perf_counter() - t0)
    starts, memory = [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="nocturne-bench-") as tmp:
            t0 = time.perf_counter()
            cp = controlplane.start(Path(tmp), binary, log=lambda _msg: None)
            starts.append(time.perf_counter() - t0)
            time.sleep(3)  # let the controllers finish their initial sync
            memory.append({n: rss_mib(p.pid) for n, p in cp.processes.items()})
            cp.stop()
    base = statistics.median(baseline)
    start = statistics.median(starts)
    print(f"runs: {runs}")
    print(f"baseline  binary start (kube-local version): {base * 1000:8.1f} ms")
    print(
        f"warm start etcd+apiserver+controller-manager: {start:8.2f} s  "
        f"({start / base:.0f}x the baseline)"
    )
    for name in controlplane.COMPONENTS:
        values = [m[name] for m in memory]
        median = statistics.median(values)
        print(f"RSS {name:<24} median {median:7.1f} MiB  max {max(values):7.1f} MiB")
    total = [sum(m.values()) for m in memory]
    print(
        f"RSS total                    median {statistics.median(total):7.1f} MiB  "
        f"max {max(total):7.1f} MiB"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)

"""Run a command inside a Linux memory cgroup (v1 or v2) whose cap counts the page cache too.

Used to show a model several times larger than the cap decoding to the end: the kernel
reclaims the cgroup's page cache when it reaches the cap and kills the group if anonymous
memory alone exceeds it, so "completes, no OOM kill" is a real test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup")


class MemoryCap:
    """A fresh memory cgroup limited to ``limit`` bytes (removed on ``close``)."""

    def __init__(self, name: str, limit: int):
        self.limit = limit
        if (V1 / "memory.limit_in_bytes").exists() or (V1 / "tasks").exists():
            self.v2, self.path = False, V1 / name
        elif (V2 / "cgroup.controllers").exists():
            self.v2, self.path = True, V2 / name
        else:
            raise OSError("no memory cgroup (v1 or v2) found under /sys/fs/cgroup")
        if self.path.exists():
            self.path.rmdir()
        self.path.mkdir()
        if self.v2:
            (self.path / "memory.max").write_text(str(limit))
            (self.path / "memory.swap.max").write_text("0") if (self.path / "memory.swap.max").exists() else None
        else:
            (self.path / "memory.limit_in_bytes").write_text(str(limit))

    def join(self) -> None:
        """Move the calling process into the group (used as a child's ``preexec_fn``)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> Optional[int]:
        f = self.path / ("memory.peak" if self.v2 else "memory.max_usage_in_bytes")
        return int(f.read_text()) if f.exists() else None

    def oom_kills(self) -> int:
        if self.v2:
            events = dict(l.split() for l in (self.path / "memory.events").read_text().splitlines())
            return int(events.get("oom_kill", 0))
        ctl = dict(l.split() for l in (self.path / "memory.oom_control").read_text().splitlines())
        return int(ctl.get("oom_kill", 0))

    def close(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def run_capped(limit: int, argv: List[str], timeout: float = 900) -> Dict:
    """Run ``argv`` (a Python child printing one JSON line last) under a cap of ``limit`` bytes."""
    cap = MemoryCap(f"flash-moe-bench-{os.getpid()}", limit)
    try:
        proc = subprocess.run(argv, preexec_fn=cap.join, capture_output=True, text=True, timeout=timeout)
        result: Dict = {"returncode": proc.returncode, "cgroup_peak": cap.peak(), "oom_kills": cap.oom_kills(),
                        "cgroup": "v2" if cap.v2 else "v1", "stdout": proc.stdout[-4000:],
                        "stderr": proc.stderr[-20000:]}
        lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        if proc.returncode == 0 and lines:
            result.update(json.loads(lines[-1]))
        return result
    finally:
        cap.close()


RSS_PARTS = ("RssAnon", "RssFile", "RssShmem")  # anonymous / file-mapped / shared resident memory


def status_fields(fields: Sequence[str]) -> Dict[str, int]:
    """``/proc/self/status`` fields in KiB (e.g. ``VmRSS``, ``VmHWM``), 0 where absent; one read."""
    values = dict.fromkeys(fields, 0)
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in values:
                values[key] = int(line.split()[1])
    return values


def status_kb(field: str) -> int:
    """One ``/proc/self/status`` field in KiB, 0 if absent."""
    return status_fields((field,))[field]


def own_usage() -> str:
    """The calling process's RSS (anonymous / file-mapped / shared parts) and its memory cgroup's
    usage (anon / file), for progress lines."""
    parts = " / ".join(f"{kb / 1024:.0f}" for kb in status_fields(RSS_PARTS).values())
    out = f"rss {status_kb('VmRSS') / 1024:.0f} MB (anon / file / shmem {parts})"
    groups = {}  # controller list -> path ("" is cgroup v2's unified line)
    for line in open("/proc/self/cgroup").read().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            groups[c] = path.lstrip("/")
    for base, usage, key in ((V1, "memory.usage_in_bytes", "memory"), (V2, "memory.current", "")):
        rel = groups.get(key)
        if rel is not None and (base / rel / usage).exists():
            stat = dict(l.split() for l in (base / rel / "memory.stat").read_text().splitlines())
            anon = int(stat.get("anon", stat.get("rss", 0)))
            file = int(stat.get("file", stat.get("cache", 0)))
            out += (f", cgroup {int((base / rel / usage).read_text()) / 1e6:.0f} MB "
                    f"(anon {anon / 1e6:.0f}, file {file / 1e6:.0f})")
            break
    return out


def child_argv(*args: str) -> List[str]:
    return [sys.executable, "-m", "benchmarks.streaming", *args]

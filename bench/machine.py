"""Benchmarks: what every results file records — the machine, the versions and the command."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import sys
from importlib import metadata


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions(*packages: str) -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def header(title: str, *packages: str) -> str:
    cores = len(os.sched_getaffinity(0))
    lines = [
        f"# {title}",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}",
        f"- machine: {cpu_model()}, {cores} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions(*packages).items()),
        f"- command: `{shlex.join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])}`",
        "",
    ]
    return "\n".join(lines)

"""Benchmarks: what every results file records — the machine, the versions and the command."""

from __future__ import annotations

import datetime as dt
import os
import shlex
import sys

from llmpack.cli.bench_workload import cpu_model, versions  # one definition, shared with the peers


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

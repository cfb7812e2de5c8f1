"""Benchmarks: what every results file records — the machine, the versions and the command."""

from __future__ import annotations

import datetime as dt
import os
import shlex
import sys
from pathlib import Path

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


def write_results(name: str, lines: list[str], label: str = "") -> Path:
    """bench/results/<name>-<date><label>.md, echoed to stdout with where it went."""
    out = Path(__file__).resolve().parent / "results" / f"{name}-{dt.date.today().isoformat()}{label}.md"
    out.write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + f"\n\nwritten to {out}\n")
    return out

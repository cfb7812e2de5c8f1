"""Export, all stages: progress of the long phases (hashing, writing the graph and quantizing, checksums).

On a terminal a tqdm bar; anywhere else (CI, a log file, `nohup`) plain log lines a machine keeps: one when
the phase starts, one every `every_s` seconds with percent, rate and time left, and one when it is done —
a 7B build otherwise prints nothing for minutes where nobody sees a bar.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from llmpack.runtime.manifest import FileDigest, digest_file

log = logging.getLogger("llmpack.export")
T = TypeVar("T")

EVERY_S = 10.0  # seconds between two log lines of one phase
GRAPH_PHASE = "writing the graph (quantizing where asked)"  # the layers: quantization happens as each is written


class Progress:
    """A phase of `total` units (bytes, layers, files); `advance(n)` as work is done, `close()` at the end."""

    def __init__(self, phase: str, total: float, unit: str, tty: bool, every_s: float = EVERY_S):
        self.phase, self.total, self.unit, self.every_s = phase, total, unit, every_s
        self.done = 0.0
        self.started = self._last = time.monotonic()
        self._bar = None
        if tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=phase, unit=unit, unit_scale=unit == "B", leave=False)
        else:
            log.info("%s: %s to do", phase, _amount(total, unit))

    def advance(self, amount: float = 1) -> None:
        self.done += amount
        if self._bar is not None:
            self._bar.update(amount)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s and self.done < self.total:
            self._last = now
            rate = self.done / max(now - self.started, 1e-9)
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info("%s: %.0f%% (%s of %s), %s/s, about %s left", self.phase, 100 * self.done / self.total,
                     _amount(self.done, self.unit), _amount(self.total, self.unit), _amount(rate, self.unit),
                     _duration(left))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            return
        seconds = time.monotonic() - self.started
        log.info("%s: done, %s in %s (%s/s)", self.phase, _amount(self.done, self.unit), _duration(seconds),
                 _amount(self.done / max(seconds, 1e-9), self.unit))


def progress_of(items: Iterable[T], total: int, phase: str, unit: str, tty: bool) -> Iterator[T]:
    """`items`, reporting one unit per item as a Progress phase."""
    progress = Progress(phase, total, unit, tty)
    try:
        for item in items:
            yield item
            progress.advance()
    finally:
        progress.close()


def tensorrt_progress_monitor(trt, tty: bool):
    """A trt.IProgressMonitor (TensorRT 10+) reporting the engine build's top-level phases as Progress phases.

    TensorRT calls it from its own threads, hence the lock; nested phases repeat inside their parent's and
    are left out. Set it as `builder_config.progress_monitor` and keep it alive until the build returns.
    """
    import threading

    class EngineBuildProgress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._phases: dict[str, Progress] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                with self._lock:
                    self._phases[phase_name] = Progress(f"TensorRT: {phase_name}", num_steps, "step", tty)

        def step_complete(self, phase_name, step):
            with self._lock:
                if phase_name in self._phases:
                    self._phases[phase_name].advance()
            return True  # never cancels the build

        def phase_finish(self, phase_name):
            with self._lock:
                phase = self._phases.pop(phase_name, None)
            if phase is not None:
                phase.close()

    return EngineBuildProgress()


def digest_files(folder: Path, relatives: Sequence[str], phase: str, tty: bool) -> tuple[FileDigest, ...]:
    """SHA-256 and size of each file, as one phase whose progress is the bytes hashed."""
    progress = Progress(phase, sum((folder / name).stat().st_size for name in relatives), "B", tty)
    try:
        return tuple(digest_file(folder, name, progress.advance) for name in relatives)
    finally:
        progress.close()


def _amount(value: float, unit: str) -> str:
    if unit == "B":
        for size, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if value >= size:
                return f"{value / size:.1f} {name}"
        return f"{value:.0f} B"
    if value == int(value):
        return f"{int(value)} {unit}" + ("" if value == 1 else "s")
    return f"{value:.1f} {unit}s"


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "an unknown time"
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"

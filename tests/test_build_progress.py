"""Build progress where nobody sees a bar: a build with its output in a file logs each long phase."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

from llmpack.export.progress import Progress, progress_of

LLM_EXPORT = str(Path(sys.executable).with_name("llm-export"))


def test_a_build_into_a_file_logs_every_phase(tmp_path):
    log_path = tmp_path / "build.log"
    with open(log_path, "w") as log:
        subprocess.run([LLM_EXPORT, "build", "--model", "demo", "--out", str(tmp_path / "demo"), "--quant", "int4"],
                       stdout=log, stderr=subprocess.STDOUT, check=True)
    lines = log_path.read_text().splitlines()
    for phase in ("hashing the checkpoint", "writing the graph (quantizing where asked)", "checksumming the artifact"):
        assert any(line.endswith(" to do") and f"{phase}: " in line for line in lines), (phase, lines)
        done = [line for line in lines if f"{phase}: done, " in line]
        assert len(done) == 1 and re.search(r"done, .+ in \d+\.\d s \(.+/s\)$", done[0]), done
    assert "writing the graph (quantizing where asked): 4 layers to do" in "\n".join(lines)
    assert "\r" not in log_path.read_text()  # no bar drawn into a file


def test_periodic_lines_say_percent_rate_and_time_left(caplog):
    caplog.set_level(logging.INFO, logger="llmpack.export")
    progress = Progress("hashing", 4 * 2**20, "B", tty=False, every_s=0.0)
    for _ in range(3):
        progress.advance(2**20)
    progress.close()
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0] == "hashing: 4.0 MiB to do"
    assert re.fullmatch(r"hashing: 75% \(3\.0 MiB of 4\.0 MiB\), .+/s, about .+ left", messages[3]), messages
    assert messages[-1].startswith("hashing: done, 3.0 MiB in ")


def test_progress_of_yields_every_item_and_closes_on_early_exit(caplog):
    caplog.set_level(logging.INFO, logger="llmpack.export")
    assert list(progress_of(range(3), 3, "layers", "layer", tty=False)) == [0, 1, 2]
    items = progress_of(range(3), 3, "cut", "layer", tty=False)
    assert next(items) == 0 and next(items) == 1  # the first item's work is done once the second is asked for
    items.close()
    assert any(record.getMessage().startswith("cut: done, 1 layer in ") for record in caplog.records)


def test_tensorrt_build_phases_are_reported_with_its_progress_monitor(caplog):
    """TensorRT cannot be installed here: its IProgressMonitor is stood in for by a plain base class with
    the same three calls, made as TensorRT 10 makes them (a nested phase inside a top-level one)."""
    from types import SimpleNamespace

    from llmpack.export.progress import tensorrt_progress_monitor

    class IProgressMonitor:
        def __init__(self):
            pass

    caplog.set_level(logging.INFO, logger="llmpack.export")
    monitor = tensorrt_progress_monitor(SimpleNamespace(IProgressMonitor=IProgressMonitor), tty=False)
    assert isinstance(monitor, IProgressMonitor)
    monitor.phase_start("Building engine", None, 3)
    monitor.phase_start("Tactic selection", "Building engine", 40)  # nested: not reported on its own
    assert all(monitor.step_complete("Tactic selection", i) for i in range(40))
    monitor.phase_finish("Tactic selection")
    assert all(monitor.step_complete("Building engine", i) for i in range(3))  # never cancels the build
    monitor.phase_finish("Building engine")
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0] == "TensorRT: Building engine: 3 steps to do"
    assert messages[-1].startswith("TensorRT: Building engine: done, 3 steps in ")
    assert not any("Tactic selection" in message for message in messages)

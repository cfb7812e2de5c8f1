"""Export stage 5 (GPU): what an engine build leaves for a person to read — TensorRT's log and its layers.

With a report folder (`EngineBuildOptions.report_dir`, used by bench/gpu_check.py) the build writes
TensorRT's VERBOSE log to `tensorrt-build.log` (warnings and errors still reach our log) and, once the
plan exists, the engine inspector's per-layer JSON to `engine-layers.json` (which tactics and fused
layers TensorRT chose, in which precision): the two things to read when an engine is wrong or slow.
Without one, only warnings and errors are logged, as before. TensorRT is passed in, never imported here.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("llmpack.export")

BUILD_LOG = "tensorrt-build.log"
LAYERS_JSON = "engine-layers.json"


def build_logger(trt, report_dir: Path | None):
    """trt.Logger(WARNING) without a report folder; else an ILogger writing every message to the log file."""
    if report_dir is None:
        return trt.Logger(trt.Logger.WARNING)
    report_dir.mkdir(parents=True, exist_ok=True)
    return _file_logger(trt, report_dir / BUILD_LOG)


def _file_logger(trt, path: Path):
    warning = int(trt.ILogger.Severity.WARNING)

    class FileLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.min_severity = trt.ILogger.Severity.VERBOSE
            self.handle = open(path, "w", encoding="utf-8")  # noqa: SIM115 - open for the build's whole life
            self.path = path

        def log(self, severity, msg):
            self.handle.write(f"[{getattr(severity, 'name', severity)}] {msg}\n")
            if int(severity) <= warning:  # lower is more severe: INTERNAL_ERROR 0 … VERBOSE 4
                log.warning("TensorRT: %s", " ".join(str(msg).split()))

        def close(self):
            self.handle.close()

    return FileLogger()


def detailed_profiling(trt, builder_config, report_dir: Path | None) -> None:
    """The inspector only names layers' tactics and precisions in an engine built with DETAILED verbosity."""
    if report_dir is not None:
        builder_config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED


def write_layer_report(trt, logger, plan, report_dir: Path | None) -> Path | None:
    """engine-layers.json from the built plan, or None without a report folder (or when TensorRT cannot say)."""
    if report_dir is None:
        return None
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        log.warning("TensorRT could not load the plan it just built to list its layers (see %s)", BUILD_LOG)
        return None
    inspector = engine.create_engine_inspector()
    path = report_dir / LAYERS_JSON
    path.write_text(inspector.get_engine_information(trt.LayerInformationFormat.JSON), encoding="utf-8")
    del inspector, engine  # the inspector reads the engine: release it first
    return path


def close_logger(logger) -> None:
    getattr(logger, "close", lambda: None)()

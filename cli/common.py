"""CLI edge helpers shared by `llm-export` and `llm-serve`: logging, error translation, option defaults."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
import time
from types import SimpleNamespace

import click

from llmpack.runtime.errors import LlmpackError


def setup_logging(verbose: bool, log_format: str = "text", timestamps: bool = False) -> None:
    """stderr logging: `LEVEL logger: message` for one-shot commands; a long-running server adds UTC
    timestamps, or writes one JSON object per line (`--log-format json`) for log shippers."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(utc_formatter(("%(asctime)s " if timestamps else "") + "%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def utc_formatter(fmt: str) -> logging.Formatter:
    formatter = logging.Formatter(fmt)
    formatter.converter = time.gmtime
    formatter.default_time_format, formatter.default_msec_format = "%Y-%m-%dT%H:%M:%S", "%s.%03dZ"
    return formatter


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message[, exception].

    Four fields through json.dumps: no logging library is needed for that.
    """

    def __init__(self):
        super().__init__()
        self._time = utc_formatter("%(asctime)s")

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self._time.format(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def translate_errors(command):
    """Run a command; a domain error becomes one 'error: …' line on stderr and its exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except LlmpackError as exc:
            click.echo(f"error: {exc.message}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def defaults_of(options_class) -> SimpleNamespace:
    """The field defaults of an options dataclass: a click option shows and uses the one defined there."""
    return SimpleNamespace(**{field.name: field.default for field in dataclasses.fields(options_class)
                              if field.default is not dataclasses.MISSING})

"""CLI edge helpers shared by `llm-export` and `llm-serve`: logging, error translation, option defaults."""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from types import SimpleNamespace

import click

from llmpack.runtime.errors import LlmpackError


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


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

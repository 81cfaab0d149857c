"""Console helpers every command shares: logging set-up and the one-line error exit.

Plugin CLIs (`app.cluster.cli`, `app.deepspeed.cli`, ...) import these from here, never from `app.cli`
(which imports the plugins): the import graph stays a tree.
"""

from __future__ import annotations

import logging
import sys

import typer


def setup_logging(level: str = "info", access_log: bool = True) -> None:
    """Log to stderr at `level`; `access_log=False` silences the `app.access` logger."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not access_log:
        logging.getLogger("app.access").setLevel(logging.WARNING)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a one-line error and return the Exit to raise."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)

"""Every ``twist`` command: its parser (``command_parser``, so ``--config FILE`` works everywhere) and ``main``.

One module per command; the library modules they call keep only library code. ``run_command`` is the one
place that turns a known error into ``twist CMD: error: ...`` on one line and an exit code:
2 for the user's input or options (``UserError`` and the standard errors of bad paths and values),
1 for a run that failed on good input (``RunFailure``); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from twist_core.config import build_config
from twist_core.errors import RunFailure, UserError

C = TypeVar("C")
KNOWN_ERRORS = (RunFailure, UserError, ValueError, OSError)  # ValueError, OSError: bad values and paths given


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split("\n")).strip() or type(error).__name__


def run_command(prog: str, parser: argparse.ArgumentParser, cls: type[C], argv: list[str] | None,
                body: Callable[[C], int], explain: Callable[[BaseException, Any], str | None] | None = None) -> int:
    """Parse ``argv`` (the ``--config`` file first, flags over it), run ``body(config)`` and report a known
    error as one line; ``explain(error, config_or_None)`` may give a more helpful message for it."""
    args = parser.parse_args(argv)
    config = None
    try:
        config = build_config(cls, args, args.config)
        return body(config)
    except KNOWN_ERRORS as error:
        message = (explain(error, config) if explain else None) or one_line(error)
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 1 if isinstance(error, RunFailure) else 2

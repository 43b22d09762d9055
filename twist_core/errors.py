"""The two kinds of failure a command reports in one line instead of a traceback.

Library modules raise subclasses of these; ``twist_core.commands.run_command`` maps them (and the standard
errors of user input) to ``PROG: error: MESSAGE`` and an exit code, the same for every command.
"""

from __future__ import annotations


class UserError(Exception):
    """The user's input, options or files are wrong: fix them and run again (exit code 2)."""


class RunFailure(Exception):
    """The input was fine but the run could not succeed (e.g. training diverged): exit code 1."""


def terminal_safe(text: str, limit: int = 200) -> str:
    """``text`` with every character a terminal could act on (escape sequences, bell, carriage return,
    bidirectional overrides) written as its escape, cut at ``limit`` characters: for text a command prints
    that came from a file or a package, not from the user."""
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return shown if len(shown) <= limit else shown[:limit] + "..."

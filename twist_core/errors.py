"""The two kinds of failure a command reports in one line instead of a traceback.

Library modules raise subclasses of these; ``twist_core.commands.run_command`` maps them (and the standard
errors of user input) to ``PROG: error: MESSAGE`` and an exit code, the same for every command.
"""

from __future__ import annotations


class UserError(Exception):
    """The user's input, options or files are wrong: fix them and run again (exit code 2)."""


class RunFailure(Exception):
    """The input was fine but the run could not succeed (e.g. training diverged): exit code 1."""

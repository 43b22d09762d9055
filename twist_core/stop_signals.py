"""Ctrl-C and SIGTERM remembered rather than raised, so that long work stops where it is safe to.

Training checks between steps and saves a checkpoint; the app waits for it and then closes its server and
index. Either way the signal never lands in the middle of something that cannot be interrupted cleanly.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any


class StopRequested:
    """Remembers SIGTERM/SIGINT; the owner checks ``signal_number`` where stopping is safe."""

    def __init__(self) -> None:
        self.signal_number: int | None = None

    def __call__(self, signum: int, _frame: Any) -> None:
        self.signal_number = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequested]:
        """Catch SIGTERM/SIGINT while the body runs, then put back whatever handled them before.

        Restoring matters to callers that go on afterwards: ``twist demo`` serves its app after training, and
        with the training's handler left in place Ctrl-C would be remembered and ignored.
        """
        previous = {number: signal.signal(number, self) for number in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

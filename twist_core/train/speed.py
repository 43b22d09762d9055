"""Say once when training runs at less than half the speed promised at start-up ("expected speed: about N
images/s"), with the likely reason and what it costs, instead of leaving a person to wonder why a time budget
bought so few epochs.

The decision is the pure function :func:`slow_speed_warning` (tested directly, no timing involved);
:class:`SpeedWatch` feeds it the images and seconds of training steps only (evaluations, neighbour mining and
checkpoints between epochs are not counted), over at least :data:`SETTLE_SECONDS`, so a slow first step or a
short pause does not raise it: the speed has to *stay* low.
"""

from __future__ import annotations

from dataclasses import dataclass

SLOW_FRACTION = 0.5  # warn below this share of the expected speed
SETTLE_SECONDS = 30.0  # judge the speed over at least this much training time


def slow_speed_warning(expected: float | None, images: int, seconds: float, time_budget: bool) -> str | None:
    """The one-line warning when ``images`` in ``seconds`` of training is under half of ``expected`` images/s
    (None when nothing was promised, too little was measured, or the speed is fine)."""
    if not expected or seconds < SETTLE_SECONDS:
        return None
    measured = images / seconds
    if measured >= SLOW_FRACTION * expected:
        return None
    cost = (f"the time budget buys about {measured / expected:.0%} of the epochs it would at full speed"
            if time_budget else f"the run takes about {expected / max(measured, 1e-9):.0f} times longer than expected")
    return (f"warning: training runs at {measured:.0f} images/s, under half the expected {expected:.0f}: other "
            f"processes are probably using the CPU, or the images are read from a slow disk; {cost}")


@dataclass
class SpeedWatch:
    """Training images and seconds so far (epochs before the current one), and whether the warning was given."""

    expected: float | None
    time_budget: bool
    images: int = 0
    seconds: float = 0.0
    warned: bool = False

    def check(self, epoch_images: int, epoch_seconds: float) -> str | None:
        """The warning, the first time the speed so far (this epoch's steps included) is too low; else None."""
        if self.warned:
            return None
        message = slow_speed_warning(self.expected, self.images + epoch_images, self.seconds + epoch_seconds,
                                     self.time_budget)
        self.warned = message is not None
        return message

    def end_epoch(self, epoch_images: int, epoch_seconds: float) -> None:
        self.images += epoch_images
        self.seconds += epoch_seconds

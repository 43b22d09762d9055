"""Fit a training schedule to a wall-clock budget, from the step time measured on this machine."""

from __future__ import annotations

import math
import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'90', '90s', '20m', '1h30m', '1.5h' -> seconds."""
    cleaned = text.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", cleaned):
        return float(cleaned)
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", cleaned)
    if not parts or "".join(number + unit for number, unit in parts) != cleaned:
        raise ValueError(f"cannot read the duration {text!r}: use e.g. 90s, 20m, 1h30m")
    return sum(float(number) * _UNITS[unit] for number, unit in parts)


def check_budget(text: str | None) -> None:
    """Refuse a ``--time-budget`` that cannot be read or leaves no time, before anything is decoded."""
    if text is not None and parse_duration(text) <= 0:
        raise ValueError(f"{text!r} leaves no time to train")


def fit_total_steps(done_steps: int, seconds_per_step: float, seconds_left: float, steps_per_epoch: int,
                    eval_seconds: float, eval_every: int) -> int:
    """Total step count that ends on time, leaving room for the evaluations still to come (and the final one)."""
    steps_left = max(0.0, seconds_left / max(seconds_per_step, 1e-9))
    if eval_seconds > 0:
        for _ in range(3):  # evaluations depend on the steps left and vice versa; a fixed point in a few rounds
            evals = math.floor(steps_left / max(1, steps_per_epoch * eval_every)) + 1
            steps_left = max(0.0, (seconds_left - evals * eval_seconds) / max(seconds_per_step, 1e-9))
    return done_steps + int(steps_left)

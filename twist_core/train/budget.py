"""Fit a training schedule to a wall-clock budget, from the step time measured on this machine."""

from __future__ import annotations

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
    """Total step count that ends on time, leaving room for the evaluations still to come (and the final one).

    The cost of n more steps, n * step + (n // steps_between_evals + 1) * eval, grows with n, so the largest n
    that fits is found by bisection (a fixed-point iteration oscillates when an evaluation costs many steps).
    """
    step = max(seconds_per_step, 1e-9)
    between_evals = max(1, steps_per_epoch * eval_every)

    def cost(steps: int) -> float:
        evals = steps // between_evals + 1 if eval_seconds > 0 else 0
        return steps * step + evals * eval_seconds

    low, high = 0, max(0, int(seconds_left / step))  # cost(low) fits or nothing does; cost(high + 1) does not
    while low < high:
        middle = (low + high + 1) // 2
        if cost(middle) <= seconds_left:
            low = middle
        else:
            high = middle - 1
    return done_steps + low


def format_duration(seconds: float) -> str:
    """Seconds as a person reads them: 42s, 3m05s, 1h02m."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"

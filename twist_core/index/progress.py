"""Progress of long index work on stderr (images/s, ETA) and the CPU seconds of each stage, which ``twist
index`` records in the index's info and prints: where a large build spends its time, without a profiler."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

Item = TypeVar("Item")
EVERY_S = 10.0  # seconds between progress lines


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Stages:
    """CPU seconds per named stage, and progress lines for stages that count images."""

    def __init__(self, quiet: bool = False) -> None:
        self.cpu: dict[str, float] = {}
        self.quiet = quiet
        self._stage, self._since = "", cpu_seconds()

    def start(self, stage: str) -> None:
        now = cpu_seconds()
        if self._stage:
            self.cpu[self._stage] = round(self.cpu.get(self._stage, 0.0) + now - self._since, 2)
        self._stage, self._since = stage, now

    def finish(self) -> dict[str, float]:
        self.start("")
        return dict(self.cpu)

    def counted(self, items: Iterable[Item], total: int, size: Callable[[Item], int]) -> Iterator[Item]:
        """Pass ``items`` through, printing images/s and the ETA of ``total`` images every few seconds."""
        done, begun, last = 0, time.monotonic(), time.monotonic()
        for item in items:
            yield item
            done += size(item)
            now = time.monotonic()
            if not self.quiet and now - last >= EVERY_S and done:
                rate = done / (now - begun)
                print(f"twist index: {self._stage} {done:,}/{total:,} images, {rate:,.0f} images/s, "
                      f"ETA {max(0.0, (total - done) / rate):,.0f} s", file=sys.stderr, flush=True)
                last = now

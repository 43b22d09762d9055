"""The review queue: the index's images most likely in the wrong cluster first, without those a person handled.

The scores come from the index (:mod:`twist_core.label.review`, written by ``twist index``); what a person did comes
from the curation store. An image a person moved, excluded or kept (a keep confirms the image in its cluster,
as the Cluster view's Confirm does, so twist finetune learns from it too) leaves the queue; undo brings it back.
Both databases are read through one read-only connection, so a page is one SQL query at any size.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from twist_core.index import review_table
from twist_core.index.metadata import IMAGES, chunked_in


@dataclass(frozen=True)
class QueueEntry:
    id: int
    score: float
    suggestion: int | None


class ReviewQueue:
    """Pages of unhandled images by descending score; ``available`` is False for an index without scores."""

    def __init__(self, curation_path: Path, meta_path: Path) -> None:
        self._db = sqlite3.connect(f"file:{Path(curation_path).resolve()}?mode=ro", uri=True,
                                   check_same_thread=False, timeout=30)
        self._db.execute("ATTACH DATABASE ? AS idx", (f"file:{Path(meta_path).resolve()}?mode=ro",))
        self._lock = threading.Lock()
        self.available = review_table.has_scores(self._db, "idx")

    # The join with the images drops stale scores (an index changed without a refresh); a person's move,
    # exclusion or confirmation takes an image out of the queue.
    FROM = (f"FROM idx.review r JOIN idx.{IMAGES.name} i ON i.{IMAGES.id} = r.id "
            "LEFT JOIN overrides o ON o.image_id = r.id LEFT JOIN confirmed c ON c.image_id = r.id "
            "WHERE o.image_id IS NULL AND c.image_id IS NULL")

    def count(self, scored: int | None = None) -> int:
        """Unhandled scored images: ``scored`` (the generation's kept figure) less the handled ones among them,
        so the cost follows the moves and confirmations; counted over every score when it is not known."""
        if not self.available:
            return 0
        with self._lock:
            if scored is None:
                return int(self._db.execute(f"SELECT COUNT(*) {self.FROM}").fetchone()[0])
            handled = self._db.execute(
                "SELECT COUNT(*) FROM (SELECT image_id FROM overrides UNION SELECT image_id FROM confirmed) h "
                f"CROSS JOIN idx.review r ON r.id = h.image_id CROSS JOIN idx.{IMAGES.name} i ON i.{IMAGES.id} = r.id"
            ).fetchone()[0]
            return int(scored) - int(handled)

    def page(self, offset: int, limit: int) -> list[QueueEntry]:
        if not self.available:
            return []
        with self._lock:
            rows = self._db.execute(f"SELECT r.id, r.score, r.suggestion {self.FROM} ORDER BY r.score DESC, r.id "
                                    "LIMIT ? OFFSET ?", (int(limit), int(offset))).fetchall()
        return [QueueEntry(int(i), float(score), suggestion) for i, score, suggestion in rows]

    def scores(self, ids: list[int]) -> dict[int, QueueEntry]:
        """The scores of ``ids`` whether handled or not (an inspected image, a cluster sorted by doubt)."""
        if not self.available:
            return {}
        with self._lock:
            rows = chunked_in(lambda sql, values: self._db.execute(sql, values).fetchall(),
                              "SELECT id, score, suggestion FROM idx.review WHERE id IN ({marks})",
                              [int(i) for i in ids])
        return {int(i): QueueEntry(int(i), float(score), suggestion) for i, score, suggestion in rows}

    def share_above(self, score: float) -> float:
        """The share of the index's images scored at least ``score`` (small: one of the most doubtful)."""
        with self._lock:
            # two counts, the first over the score index, not a pass over every row per inspected image
            above, total = self._db.execute("SELECT (SELECT COUNT(*) FROM idx.review WHERE score >= ?), "
                                            "(SELECT COUNT(*) FROM idx.review)", (float(score),)).fetchone()
        return float(above or 0) / max(1, int(total or 0))

    def close(self) -> None:
        self._db.close()

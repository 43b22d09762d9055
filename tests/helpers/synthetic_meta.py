"""A generation's metadata database written directly with SQLite (no model, no FAISS): the app's SQL is timed
and checked on it at any N. Ten clusters, the largest a third of the images, some confidences unknown and
some tied."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path

import numpy as np

from twist_core.index import review_table
from twist_core.index.derived import write_derived
from twist_core.index.metadata import SCHEMA

CLUSTERS = 10


def write_meta(path: Path, n: int, seed: int = 0, derived: bool = True, chunk: int = 100_000) -> Path:
    """``path`` holding ``n`` images in the index's schema with review scores (and its derived tables unless
    ``derived`` is False)."""
    rng = np.random.default_rng(seed)
    shares = np.array([1 / 3, *([(2 / 3) / (CLUSTERS - 1)] * (CLUSTERS - 1))])
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(SCHEMA + review_table.TABLE_SQL)
        for start in range(0, n, chunk):
            count = min(chunk, n - start)
            clusters = rng.choice(CLUSTERS, count, p=shares)
            confidence = np.round(rng.uniform(0.1, 1.0, count), 2)  # rounded: many ties, as keysets must handle
            unknown = rng.random(count) < 0.01
            rows = [(start + k, f"c{c}/img{start + k:07d}.png", int(c), f"cluster {c}",
                     None if unknown[k] else float(confidence[k]), 0.1, f"[[{c}, 0.9]]", f"{start + k}:0")
                    for k, c in enumerate(clusters)]
            db.executemany("INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            db.executemany("INSERT INTO review (id, score, suggestion) VALUES (?, ?, ?)",
                           [(start + k, float(score), None) for k, score in enumerate(rng.random(count))])
        db.execute("INSERT INTO info VALUES (?, ?)",
                   (review_table.INFO_KEY, json.dumps({"version": review_table.VERSION})))
        db.commit()
        if derived:
            write_derived(db)
    return path

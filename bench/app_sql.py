"""The SQL the app runs per request, before and after issue 39, on synthetic metadata of 10k, 100k and 1M images.

The metadata is written directly with SQLite in the index's schema (``tests/helpers/synthetic_meta.py``: ten
clusters, the largest a third; no FAISS needed to time SQL), with a curation store holding moves, exclusions and a
merge. "before" are the statements of main at 2699f2e (the cluster page's membership test, OFFSET, count before
every page, grouped summary, review count over every score, the map's id list), "after" the store's methods now.
Each figure is the median CPU time of repeated runs, in ms; the plans of the "after" statements are checked for a
SCAN of the images or a temporary B-tree outside the moved images.

    python -m bench.app_sql [--sizes 10000 100000 1000000]
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import REPO, save
from twist_core.curate.curation import EXCLUDED, RECORD_SQL, CurationStore
from twist_core.index.derived import write_derived
from twist_core.index.metadata import chunked_in

sys.path.insert(0, str(REPO / "tests"))
from helpers.synthetic_meta import CLUSTERS, write_meta  # the tests' writer, shared

REPEATS = 7
PAGE = 60


def cpu_ms(work: Callable[[], object], repeats: int = REPEATS) -> float:
    """Median CPU milliseconds of ``work`` (the machine is shared: wall time would measure the neighbours)."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        work()
        times.append((time.process_time() - start) * 1000)
    return round(statistics.median(times), 2)


def old_where(store: CurationStore, label: int) -> tuple[str, list]:
    """main's membership test of a cluster page (not index-friendly: an OR over two tables, COALESCE)."""
    sources = [label, *[c for c, into in store.merges().items() if into == label]]
    marks = ",".join("?" * len(sources))
    return (f"((i.cluster IN ({marks}) AND o.cluster IS NULL) OR o.cluster = ?) AND COALESCE(i.confidence, 0) "
            "BETWEEN ? AND ?", [*sources, label, 0.0, 1.0])


def before(store: CurationStore, label: int, middle: int, merged: int, merged_middle: int
           ) -> dict[str, Callable[[], object]]:
    where, params = old_where(store, label)
    joins = RECORD_SQL[RECORD_SQL.index(" FROM "):]

    def page(offset: int, label: int = label) -> object:
        where, params = old_where(store, label)
        count = store._query(f"SELECT COUNT(*) {joins} WHERE {where}", params)
        rows = store._query(f"{RECORD_SQL} WHERE {where} ORDER BY i.confidence DESC, i.id LIMIT ? OFFSET ?",
                            [*params, PAGE, offset])
        return count, rows

    return {
        "summary (GET /api/v1/clusters, dropdowns)": lambda: store._query(
            "SELECT COALESCE(o.cluster, m.into_cluster, i.cluster) AS label, COUNT(*), AVG(i.confidence) "
            f"{joins} WHERE i.cluster IS NOT NULL OR o.cluster IS NOT NULL GROUP BY label ORDER BY label"),
        "cluster page 0 (count + page)": lambda: page(0),
        "cluster page in the middle (count + page)": lambda: page(middle),
        "review queue count": lambda: store._query(
            "SELECT COUNT(*) FROM idx.review r JOIN idx.images i ON i.id = r.id LEFT JOIN overrides o ON "
            "o.image_id = r.id LEFT JOIN confirmed c ON c.image_id = r.id WHERE o.image_id IS NULL AND "
            "c.image_id IS NULL"),
        "map ids": lambda: store._query("SELECT id FROM idx.images ORDER BY id"),
        "count, confidence 0.3-0.7": lambda: store._query(
            f"SELECT COUNT(*) {joins} WHERE {where.replace('BETWEEN ? AND ?', 'BETWEEN 0.3 AND 0.7')}", params[:-2]),
        "jump to the middle page by number": lambda: page(middle),
        "jump to the middle page of a merged cluster by number": lambda: page(merged_middle, merged),
        "doubtful page 0": lambda: doubtful(store, label),
        "overview covers (page of 4 per cluster)": lambda: [
            store._query(f"{RECORD_SQL} WHERE {old_where(store, c)[0]} ORDER BY i.confidence DESC, i.id LIMIT 4",
                         old_where(store, c)[1]) for c in range(CLUSTERS) if store.merged_into(c) == c],
    }


def doubtful(store: CurationStore, label: int) -> list:
    """main's doubtful-first page: every member of the cluster, their scores, sorted in Python."""
    where, params = old_where(store, label)
    members = [r[0] for r in store._query(f"{RECORD_SQL} WHERE {where}", params)]
    scores = dict(chunked_in(store._query, "SELECT id, score FROM idx.review WHERE id IN ({marks})", members))
    return sorted(members, key=lambda i: (-scores.get(i, 0.0), i))[:PAGE]


def after(store: CurationStore, meta: Path, label: int, middle: int, merged: int, merged_middle: int
          ) -> dict[str, Callable[[], object]]:
    from app.review_queue import ReviewQueue

    cursor = store.seek(label, middle)
    queue = ReviewQueue(store.path, meta)
    return {
        "summary (GET /api/v1/clusters, dropdowns)": store.summary,
        "cluster page 0 (count + page)": lambda: (store.count(label), store.page(label, PAGE)),
        "cluster page in the middle (count + page)": lambda: (store.count(label),
                                                              store.page(label, PAGE, after=cursor)),
        "review queue count": lambda: queue.count(store.derived.review_rows),
        "map ids": lambda: store.sample(5000),
        "count, confidence 0.3-0.7": lambda: store.count(label, 0.3, 0.7),
        "jump to the middle page by number": lambda: store.page(label, PAGE, after=store.seek(label, middle)),
        "jump to the middle page of a merged cluster by number": lambda: store.page(
            merged, PAGE, after=store.seek(merged, merged_middle)),
        "doubtful page 0": lambda: store.doubtful_page(label, 0, PAGE),
        "overview covers (page of 4 per cluster)": lambda: [store.page(c, 4) for c in range(CLUSTERS)
                                                            if store.merged_into(c) == c],
    }


def plan_problems(store: CurationStore, work: Callable[[], object]) -> list[str]:
    """Plan lines of ``work``'s statements that scan the images or sort outside the images moved in."""
    sent: list[str] = []
    store._db.set_trace_callback(sent.append)
    work()
    store._db.set_trace_callback(None)
    found = []
    for sql in sent:
        if not sql.lstrip().upper().startswith("SELECT"):
            continue
        for row in store._db.execute(f"EXPLAIN QUERY PLAN {sql}"):
            if row[3].startswith(("SCAN i ", "SCAN i", "SCAN idx.images")) or (
                    "TEMP B-TREE" in row[3] and "FROM overrides o" not in sql):
                found.append(f"{row[3]} <- {sql[:80]}")
    return found


def measure(n: int, folder: Path) -> dict:
    meta = write_meta(folder / f"n{n}" / "gen-000001" / "meta.sqlite", n, derived=False)
    start = time.process_time()
    with contextlib.closing(sqlite3.connect(meta)) as db:
        write_derived(db)
    derived_s = time.process_time() - start
    store = CurationStore(folder / f"n{n}" / "curation.sqlite", meta, [f"c{c}" for c in range(CLUSTERS)])
    try:
        largest = max(store.summary(), key=lambda c: c["size"])
        label, middle = largest["cluster"], (largest["size"] // 2) // PAGE * PAGE
        store.move([r.id for r in store.page(label, 300)][::3], 2)
        store.move([r.id for r in store.page(3, 100)][::2], EXCLUDED)
        store.merge([5], 4)
        store.confirm([r.id for r in store.page(label, 50, descending=False)])
        merged_middle = (store.count(4) // 2) // PAGE * PAGE  # 4 holds 5
        old = before(store, label, middle, 4, merged_middle)
        new = after(store, meta, label, middle, 4, merged_middle)
        for jumped, offset in ((label, middle), (4, merged_middle)):
            assert [r.id for r in store.page(jumped, PAGE, after=store.seek(jumped, offset))] == [
                r[0] for r in store._query(f"{RECORD_SQL} WHERE {old_where(store, jumped)[0]} ORDER BY "
                                           "i.confidence DESC, i.id LIMIT ? OFFSET ?",
                                           [*old_where(store, jumped)[1], PAGE, offset])]
        return {"images": n, "largest_cluster": largest["size"], "middle_offset": middle,
                "write_derived_cpu_s": round(derived_s, 2),
                "before_ms": {name: cpu_ms(work, 3 if n >= 1_000_000 else REPEATS) for name, work in old.items()},
                "after_ms": {name: cpu_ms(work) for name, work in new.items()},
                "after_plan_problems": {name: plan_problems(store, work) for name, work in new.items()}}
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="twist-app-sql-") as folder:
        for n in args.sizes:
            results[f"{n // 1000}k" if n < 1_000_000 else f"{n // 1_000_000}m"] = entry = measure(n, Path(folder))
            print(n, entry["before_ms"], entry["after_ms"], flush=True)
    print(save("app_sql", {"notes": __doc__.split("\n\n")[1], "sizes": results}))


if __name__ == "__main__":
    main()

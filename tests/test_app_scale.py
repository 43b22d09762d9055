"""The app's SQL at scale: keyset pages equal the offset pages they replace, kept counts equal recomputed ones,
and the query plans on a request path read indexes, never every image (issue 39)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers.synthetic_meta import CLUSTERS, write_meta

from twist_core.curate.curation import EXCLUDED, RECORD_SQL, CurationStore, Record, _record, cursor_of
from twist_core.index.derived import QUANTILES, SAMPLE_SIZE, Derived, compute, read_derived, write_derived

N = 3000


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[CurationStore]:
    meta = write_meta(tmp_path / "gen-000001" / "meta.sqlite", N)
    opened = CurationStore(tmp_path / "curation.sqlite", meta, [f"c{c}" for c in range(CLUSTERS)])
    yield opened
    opened.close()


def offset_page(store: CurationStore, label: int, offset: int, limit: int, descending: bool, low: float,
                high: float) -> list[Record]:
    """The page as the app read it before keysets: its membership test and OFFSET (the reference)."""
    sources = [label] if label == EXCLUDED else [label, *[c for c, into in store.merges().items() if into == label]]
    if label != EXCLUDED and store.merged_into(label) != label:
        sources.remove(label)
    marks = ",".join("?" * len(sources))
    where = (f"((i.cluster IN ({marks}) AND o.cluster IS NULL) OR o.cluster = ?) "
             "AND COALESCE(i.confidence, 0) BETWEEN ? AND ?")
    rows = store._query(f"{RECORD_SQL} WHERE {where} ORDER BY i.confidence {'DESC' if descending else 'ASC'}, i.id "
                        "LIMIT ? OFFSET ?", [*sources, label, low, high, limit, offset])
    return [_record(r) for r in rows]


def curate(store: CurationStore) -> None:
    """Moves (some of them with unknown confidence), exclusions, confirmations and a merge."""
    big = store.page(0, limit=400)
    unknown = [r.id for r in store.page(0, limit=N, descending=False) if r.confidence is None][:5]
    store.move([r.id for r in big[10:60:3]] + unknown, 2)
    store.move([r.id for r in store.page(3, limit=30)][::2], 0)
    store.move([r.id for r in big[100:140]], EXCLUDED)
    store.confirm([r.id for r in big[200:220]])
    store.merge([4], 0)


def recomputed(store: CurationStore) -> dict[int, tuple[int, float | None]]:
    """Size and mean confidence per effective label, grouped over every image (the old summary)."""
    rows = store._query("SELECT COALESCE(o.cluster, m.into_cluster, i.cluster) AS label, COUNT(*), "
                        "AVG(i.confidence) FROM idx.images i LEFT JOIN overrides o ON o.image_id = i.id "
                        "LEFT JOIN merges m ON m.cluster = i.cluster GROUP BY label")
    return {c: (n, mean) for c, n, mean in rows}


def walk(store: CurationStore, label: int, descending: bool, low: float, high: float, limit: int) -> list[Record]:
    """Every page by keyset, each after the last image of the one before."""
    pages, after = [], None
    while True:
        page = store.page(label, limit, descending, low, high, after=after)
        if not page:
            return pages
        pages.append(page)
        after = cursor_of(page[-1])


@pytest.mark.parametrize("descending", [True, False])
@pytest.mark.parametrize(("low", "high"), [(0.0, 1.0), (0.3, 0.71), (0.0, 0.5)])
def test_keyset_pages_equal_the_offset_pages(store: CurationStore, descending: bool, low: float, high: float) -> None:
    curate(store)
    for label in (0, 2, 3, 4, EXCLUDED):
        pages = walk(store, label, descending, low, high, 37)
        expected = [offset_page(store, label, k * 37, 37, descending, low, high) for k in range(len(pages) + 1)]
        assert pages == expected[:-1] and expected[-1] == [], label
        assert store.count(label, low, high) == sum(map(len, pages))
        if len(pages) > 2:  # back one page from the third, as the view's "previous page" does
            assert store.page(label, 37, descending, low, high, before=cursor_of(pages[2][0])) == pages[1]
            assert store.seek(label, 2 * 37, descending, low, high) == cursor_of(pages[1][-1])


SPACING = 50  # images between two checkpoints here (CHECKPOINT is 1,000): many checkpoints in N = 3,000


@pytest.fixture()
def spaced(tmp_path: Path) -> Iterator[CurationStore]:
    """A store over metadata whose checkpoints are ``SPACING`` images apart."""
    meta = write_meta(tmp_path / "gen-000001" / "meta.sqlite", N, derived=False)
    with contextlib.closing(sqlite3.connect(meta)) as db:
        write_derived(db, SPACING)
    opened = CurationStore(tmp_path / "curation.sqlite", meta, [f"c{c}" for c in range(CLUSTERS)])
    yield opened
    opened.close()


def check_jumps(store: CurationStore, label: int, low: float = 0.0, high: float = 1.0) -> None:
    """Every page number's cursor (and a few offsets past the end) is the last image before it by OFFSET."""
    for descending in (True, False):
        every = offset_page(store, label, 0, N, descending, low, high)
        for offset in [*range(1, len(every) + 3, 7), len(every) - 1, len(every)]:
            expected = cursor_of(every[offset - 1]) if 0 < offset <= len(every) else None
            assert store.seek(label, offset, descending, low, high) == expected, (label, descending, offset)


def test_page_number_jumps_start_at_a_checkpoint_and_equal_the_walk(spaced: CurationStore) -> None:
    store = spaced
    assert store.derived.checkpoints
    for cluster in range(CLUSTERS):  # every SPACING-th image in page order, unknown confidences included
        for descending in (True, False):
            order = [cursor_of(r) for r in offset_page(store, cluster, 0, N, descending, 0.0, 1.0)]
            kept = store._query("SELECT rank, confidence, id FROM idx.derived_checkpoints WHERE cluster = ? "
                                "AND descending = ? ORDER BY rank", (cluster, int(descending)))
            assert kept == [(k, *order[k - 1]) for k in range(SPACING, len(order) + 1, SPACING)]
    big = store.page(0, limit=N)
    steps = [lambda: store.move([r.id for r in big[5:400:4]], 2),  # out of 0, before and after checkpoints
             lambda: store.move([r.id for r in store.page(3, limit=200)][::3], 0),  # into 0
             lambda: store.move([r.id for r in store.page(0, limit=N, descending=False)][:30], EXCLUDED),
             lambda: store.move([r.id for r in big[2:12]], 0)]  # moved back where they were predicted
    for step in steps:
        step()
        overrides = store._query("SELECT COUNT(*) FROM overrides")[0][0]
        for descending in (True, False):
            start, passed = store._checkpoint(0, 900, descending)  # deep: near a checkpoint, not the start
            assert start is not None and 900 - SPACING - overrides <= passed < 900, (descending, passed)
        for label in (0, 2, 3, EXCLUDED):
            check_jumps(store, label)
    for _ in steps:
        store.undo()
        check_jumps(store, 0)


def test_page_number_jumps_of_merged_labels_and_filtered_pages_are_exact(spaced: CurationStore) -> None:
    store = spaced
    store.move([r.id for r in store.page(0, limit=300)][::5], 4)
    store.merge([4, 6], 0)  # 0 is fed by three predicted clusters, each ranked by its own checkpoints
    for label in (0, 4):  # 4 merged away: empty
        check_jumps(store, label)
    overrides = store._query("SELECT COUNT(*) FROM overrides")[0][0]
    for descending in (True, False):
        passed = store._checkpoint(0, 1200, descending)[1]
        assert 1200 - 3 * SPACING - overrides <= passed < 1200, (descending, passed)
    check_jumps(store, 2, 0.3, 0.71)  # a confidence filter: walked
    store.undo()
    check_jumps(store, 0)
    check_jumps(store, 4)


def test_the_api_page_number_equals_the_cursor_walk(app_bundle: dict[str, Path], tmp_path: Path) -> None:
    """``GET /clusters/{id}/images?page=k`` on an index whose checkpoints lie a few images apart."""
    import shutil

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from app.api import build_router
    from app.workspace import PAGE_SIZE, Workspace
    from twist_core.index.metadata import meta_path

    index = tmp_path / "index"
    shutil.copytree(app_bundle["index"], index)
    with contextlib.closing(sqlite3.connect(meta_path(index))) as db:
        write_derived(db, 7)
    ws = Workspace(app_bundle["model"], index, state_dir=tmp_path / "state")
    try:
        cluster = ws.largest_cluster()
        assert cluster is not None and ws.store.derived.checkpoints
        ws.store.move([r.id for r in ws.store.page(cluster, 40)][::4], EXCLUDED)
        api = FastAPI()
        api.include_router(build_router(ws, 1 << 20, 2))
        client = TestClient(api)
        url = f"/api/v1/clusters/{cluster}/images"
        for lowest_first in (False, True):
            walked, after = [], None
            while True:
                answer = client.get(url, params={"lowest_first": lowest_first, **({"after": after} if after else {})})
                walked.append([i["id"] for i in answer.json()["images"]])
                after = answer.json()["after"]
                if after is None:
                    break
            numbered = [[i["id"] for i in client.get(url, params={"page": k, "lowest_first": lowest_first}).json()[
                "images"]] for k in range(len(walked))]
            assert len(walked) >= 2 and numbered == walked
            assert ws.store._checkpoint(cluster, PAGE_SIZE, not lowest_first)[1] > PAGE_SIZE - 7 - 10  # jumped
    finally:
        ws.close()


def test_kept_counts_equal_recomputed_ones_after_moves_merges_and_undo(store: CurationStore) -> None:
    def check() -> None:
        kept = {c["cluster"]: (c["size"], c["mean_confidence"]) for c in store.summary()}
        again = {c: v for c, v in recomputed(store).items() if c is not None}
        assert kept.keys() == again.keys()
        for cluster, (size, mean) in again.items():
            assert kept[cluster][0] == size and kept[cluster][1] == pytest.approx(mean), cluster
            assert store.count(cluster) == size

    check()
    curate(store)
    check()
    for _ in range(3):
        store.undo()
        check()


def test_the_sample_is_fixed_size_and_an_older_index_still_opens(tmp_path: Path) -> None:
    meta = write_meta(tmp_path / "old" / "meta.sqlite", SAMPLE_SIZE + 500, derived=False)
    with contextlib.closing(sqlite3.connect(meta)) as db:
        computed = read_derived(db)  # no tables: counted in memory
        assert len(computed.sample) == SAMPLE_SIZE == len(set(computed.sample))
        assert computed == compute(db)
    store = CurationStore(tmp_path / "curation.sqlite", meta, [])
    assert store.sample(5000) == list(computed.sample[:5000])
    assert sum(c["size"] for c in store.summary()) == SAMPLE_SIZE + 500
    store.close()


def plans(store: CurationStore, run: object) -> list[tuple[str, str]]:
    """(plan line, statement) of every query ``run`` sends, through a tracing connection."""
    sent: list[str] = []
    store._db.set_trace_callback(sent.append)
    try:
        run()  # type: ignore[operator]
    finally:
        store._db.set_trace_callback(None)
    return [(row[3], sql) for sql in sent if sql.lstrip().upper().startswith("SELECT")
            for row in store._db.execute(f"EXPLAIN QUERY PLAN {sql}")]


def test_request_paths_read_indexes_not_every_image(store: CurationStore) -> None:
    curate(store)
    after = cursor_of(store.page(0, limit=500)[-1])
    for run in (lambda: store.page(0, 60, True, 0.0, 1.0, after=after),
                lambda: store.page(0, 60, False, 0.2, 0.9, before=after),
                lambda: store.count(0, 0.2, 0.9), store.summary):
        lines = plans(store, run)
        assert lines
        scans = [(line, sql) for line, sql in lines if line.startswith(("SCAN i", "SCAN idx.images"))]
        assert not scans, scans
        # a sort only over the images moved in (their number follows the overrides, never N)
        sorts = [(line, sql) for line, sql in lines if "TEMP B-TREE" in line and "FROM overrides o" not in sql]
        assert not sorts, sorts


def test_doubtful_pages_follow_the_review_scores(store: CurationStore) -> None:
    curate(store)
    store._db.execute("ATTACH DATABASE ? AS w", (store._query("SELECT file FROM pragma_database_list "
                                                              "WHERE name = 'idx'")[0][0],))
    store._db.execute("DELETE FROM w.review WHERE id % 50 = 0")  # images added since the scores: last, by id
    store._db.execute("DETACH DATABASE w")
    scores = dict(store._query("SELECT id, score FROM idx.review"))
    for label in (0, 2, EXCLUDED):
        members = [r.id for r in offset_page(store, label, 0, N, True, 0.2, 0.9)]
        ranked = sorted(members, key=lambda i: (i not in scores, -scores.get(i, 0.0), i))
        pages = [[r.id for r in store.doubtful_page(label, k * 40, 40, 0.2, 0.9)]
                 for k in range(-(-len(members) // 40) + 1)]
        assert [i for page in pages for i in page] == ranked and pages[-1] == [], label


def test_the_cluster_views_next_and_previous_pages_are_the_numbered_pages(app_bundle: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    """The Cluster view steps by the cursors of the page shown; the pages are those a page number gives."""
    from app.workspace import PAGE_SIZE, Workspace

    ws = Workspace(app_bundle["model"], app_bundle["index"], state_dir=tmp_path / "state")
    try:
        cluster = ws.largest_cluster()
        assert cluster is not None
        total = ws.store.count(cluster)
        assert total > PAGE_SIZE  # several pages to step through
        for lowest_first in (False, True):
            numbered = [[r.id for r, _ in ws.cluster_page(cluster, k, lowest_first, thumbnails=False)[0]]
                        for k in range(-(-total // PAGE_SIZE))]
            shown, stepped = ws.cluster_page(cluster, 0, lowest_first, thumbnails=False)[0], []
            for k in range(len(numbered)):
                stepped.append([r.id for r, _ in shown])
                if k + 1 < len(numbered):
                    shown = ws.cluster_page(cluster, k + 1, lowest_first, after=cursor_of(shown[-1][0]),
                                            thumbnails=False)[0]
            assert stepped == numbered
            back = ws.cluster_page(cluster, len(numbered) - 2, lowest_first, before=cursor_of(shown[0][0]),
                                   thumbnails=False)[0]
            assert [r.id for r, _ in back] == numbered[-2]
    finally:
        ws.close()


def test_the_kept_score_quantiles_give_the_share_of_images_scored_higher(store: CurationStore) -> None:
    scores = sorted((r[0] for r in store._query("SELECT score FROM idx.review")), reverse=True)
    for rank in (0, 1, 30, 700, 1500, N - 1):
        exact = sum(s >= scores[rank] for s in scores) / len(scores)
        kept = store.derived.share_at_least(scores[rank])
        assert kept is not None and abs(kept - exact) <= 2 / len(scores) + 1e-3, rank
    assert store.derived.share_at_least(scores[0]) == 1 / N  # the most doubtful image: one of N, never none


def test_a_tied_score_counts_every_image_at_it() -> None:
    """Scores tie often (every image of a cluster whose neighbours all agree and whose margin is 1): the share at a
    tied score counts all of them, not a point inside the tie."""
    scores = np.array([0.1] * 40 + [0.45] * 120 + [0.9] * 40)
    derived = Derived({}, (), len(scores), tuple(np.quantile(scores, np.linspace(0.0, 1.0, QUANTILES + 1))))
    for score in (0.1, 0.45, 0.9):
        exact = float(np.mean(scores >= score))
        assert abs(derived.share_at_least(score) - exact) <= 1 / QUANTILES + 1 / len(scores), score

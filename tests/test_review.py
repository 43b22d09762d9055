"""The review queue: the "likely wrong" score ranks planted mistakes first, in ``twist label`` tables, in the
index (build and --update), in the app's Review data path (move, keep, undo), and old indexes still open."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import REPO, chromium_page, keep_screenshots, needs_chromium

from app.workspace import AppUserError, Workspace
from twist_core import vectors as index_faiss
from twist_core.index import review_table
from twist_core.index.build import IndexConfig, build_index, update_index
from twist_core.index.image_index import IndexWriter
from twist_core.index.metadata import read_manifest
from twist_core.label import review
from twist_core.label.labeller import LabelConfig, label_folder, read_labels
from twist_core.label.table import labels_paths
from twist_core.layout import META_FILE
from twist_core.vectors import IndexPlan, build, normalized, plan_index

CENTRES, PER_CENTRE, DIM = 5, 40, 16


def planted(seed: int = 0, sure_mistakes: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Vectors around 5 centres labelled by their centre, except one image per centre whose cluster says
    another centre while it sits among its own. Every image has the same margin (only the neighbours can tell),
    or, with ``sure_mistakes``, honest margins vary and the planted ones are SURE (margin 0.95): confidence alone
    cannot find them. Returns vectors, clusters, margins, the planted rows."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(CENTRES, DIM))
    truth = np.repeat(np.arange(CENTRES), PER_CENTRE)
    vectors = (means[truth] + 0.3 * rng.normal(size=(len(truth), DIM))).astype(np.float32)
    clusters = truth.copy()
    mistakes = np.arange(CENTRES) * PER_CENTRE + rng.integers(0, PER_CENTRE, CENTRES)
    clusters[mistakes] = (truth[mistakes] + 1) % CENTRES
    margins = np.full(len(truth), 0.6, np.float32)
    if sure_mistakes:
        margins = rng.uniform(0.3, 1.0, len(truth)).astype(np.float32)
        margins[mistakes] = 0.95
    return vectors, clusters, margins, np.sort(mistakes)


def flat_index(vectors: np.ndarray) -> tuple[object, np.ndarray]:
    ids = np.arange(len(vectors), dtype=np.int64)
    return build(IndexPlan("flat"), vectors.shape[1], len(ids), lambda: iter([(ids, normalized(vectors))]), None), ids


def top(scores: np.ndarray, n: int) -> np.ndarray:
    return np.sort(np.argsort(-scores, kind="stable")[:n])


def test_planted_mistakes_rank_first_and_neighbours_suggest_their_cluster() -> None:
    vectors, clusters, margins, mistakes = planted()
    index, ids = flat_index(vectors)
    scores = review.score_index(index, ids, clusters, margins)
    assert np.array_equal(top(scores.score, len(mistakes)), mistakes)
    truth = np.repeat(np.arange(CENTRES), PER_CENTRE)
    assert np.array_equal(scores.suggestion[mistakes], truth[mistakes])
    assert ((scores.score >= 0) & (scores.score <= 1)).all()


def test_confident_mistakes_need_the_neighbour_term() -> None:
    """Mistakes the model is sure of: margin alone misses them all, the neighbour term alone finds them all."""
    vectors, clusters, margins, mistakes = planted(sure_mistakes=True)
    index, ids = flat_index(vectors)
    assert not set(top(-margins, len(mistakes))) & set(mistakes)
    neighbours_only = review.ReviewSettings(neighbour_weight=1.0)
    assert np.array_equal(top(review.score_index(index, ids, clusters, margins, neighbours_only).score,
                              len(mistakes)), mistakes)
    default = review.score_index(index, ids, clusters, margins).score
    honest = np.setdiff1d(np.arange(len(clusters)), mistakes)
    same_margin = honest[np.abs(margins[honest] - 0.95) < 0.03]  # honest images as sure as the planted ones
    assert default[mistakes].min() > default[same_margin].max()


def test_a_doubtful_cluster_ranks_before_a_clean_one_at_equal_margin() -> None:
    clusters = np.array([0, 0, 0, 1, 1, 1])
    margins = np.array([0.5, 0.1, 0.1, 0.5, 0.9, 0.9], np.float32)
    score = review.combine(np.ones(6, np.float32), margins, clusters)
    assert score[0] > score[3]
    assert review.combine(np.ones(6, np.float32), margins, clusters, review.ReviewSettings(cluster_share=0.0))[0] == \
        pytest.approx(review.combine(np.ones(6, np.float32), margins, clusters,
                                     review.ReviewSettings(cluster_share=0.0))[3])


@pytest.mark.parametrize("weighting", review.WEIGHTINGS)
def test_every_weighting_and_an_ivf_index_find_the_planted_mistakes(weighting: str) -> None:
    vectors, clusters, margins, mistakes = planted(seed=1)
    ids = np.arange(len(vectors), dtype=np.int64)
    plan = plan_index(len(ids), DIM, "ivf", nlist=8, nprobe=8)
    unit = normalized(vectors)
    index = build(plan, DIM, len(ids), lambda: iter([(ids, unit)]), unit)
    settings = review.ReviewSettings(weighting=weighting)
    scores = review.score_index(index, ids, clusters, margins, settings)
    assert np.array_equal(top(scores.score, len(mistakes)), mistakes)


def table_chunks(vectors: np.ndarray, clusters: np.ndarray, margins: np.ndarray, size: int):
    return lambda: ((clusters[s:s + size], margins[s:s + size], vectors[s:s + size])
                    for s in range(0, len(clusters), size))


@pytest.mark.parametrize("flat_max", [index_faiss.FLAT_MAX_VECTORS, 100])  # 100: the IVF path of a large table
def test_score_of_label_chunks_skips_error_rows(flat_max: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_faiss, "FLAT_MAX_VECTORS", flat_max)
    vectors, clusters, margins, mistakes = planted(seed=2)
    clusters, margins = clusters.copy(), margins.copy()
    errors = np.array([3, 77, 150])
    clusters[errors], margins[errors], vectors[errors] = -1, np.nan, 0.0
    scores = review.score_chunks(table_chunks(vectors, clusters, margins, 32), len(clusters), DIM)
    assert np.isnan(scores[errors]).all() and np.isfinite(np.delete(scores, errors)).all()
    assert np.array_equal(top(np.nan_to_num(scores, nan=-1), len(mistakes)), np.setdiff1d(mistakes, errors))


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="weighting"):
        review.ReviewSettings(weighting="cubic")
    with pytest.raises(ValueError, match="neighbour weight"):
        review.ReviewSettings(neighbour_weight=2.0)


# ---- twist label: the column, in every format
@pytest.fixture(scope="module")
def model_path(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from twist_core.deploy.export import ExportConfig, export_model

    out = tmp_path_factory.mktemp("review_model") / "tiny.onnx"
    return export_model(ExportConfig(run=str(tiny_run), out=str(out)))


def expected_scores(table: Path) -> np.ndarray:
    """The score recomputed from the written table and embeddings alone (exact FAISS over the good rows)."""
    rows, _ = read_labels(table)
    good = np.array([i for i, r in enumerate(rows) if not r["error"]])
    embeddings = np.load(labels_paths(table)[0])[good]
    index, ids = flat_index(embeddings)
    clusters = np.array([rows[i]["cluster"] for i in good])
    margins = np.array([rows[i]["margin"] for i in good], np.float32)
    full = np.full(len(rows), np.nan, np.float32)
    full[good] = review.score_index(index, ids, clusters, margins).score
    return full


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_label_writes_the_score_column(model_path: Path, shapes_folder: Path, tmp_path: Path, suffix: str) -> None:
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    folder = tmp_path / "images"
    shutil.copytree(shapes_folder, folder)
    (folder / "broken.png").write_text("not an image")
    out = tmp_path / f"labels{suffix}"
    label_folder(LabelConfig(model=str(model_path), folder=str(folder), out=str(out), chunk_size=10, batch_size=4,
                             workers=0, progress=False))
    rows, meta = read_labels(out)
    assert "review_score" in meta["columns"]
    scores = np.array([np.nan if r["review_score"] is None else r["review_score"] for r in rows], np.float32)
    broken = [i for i, r in enumerate(rows) if r["error"]]
    assert len(broken) == 1 and np.isnan(scores[broken]).all()
    good = np.delete(scores, broken)
    assert ((good >= 0) & (good <= 1)).all() and good.std() > 0
    np.testing.assert_allclose(scores, expected_scores(out), atol=2e-6)
    if suffix == ".csv":
        assert out.read_text().splitlines()[0].split(",")[-1] == "review_score"


# ---- twist index: the review table, after a build and after --update
def write_table(folder: Path, vectors: np.ndarray, clusters: np.ndarray, margins: np.ndarray,
                name: str = "labels") -> Path:
    """A labels table in the ``twist label`` layout (JSONL) over real (empty) files under folder/images."""
    root = folder / "images"
    rows = []
    for i, (cluster, margin) in enumerate(zip(clusters.tolist(), margins.tolist(), strict=True)):
        path = f"{name}/img{i:04d}.png"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(b"")
        rows.append({"path": path, "cluster": cluster, "cluster_name": f"c{cluster}", "confidence": margin,
                     "margin": margin, "topk": json.dumps([[cluster, margin]]), "error": ""})
    table = folder / f"{name}.jsonl"
    table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    embeddings_path, meta_path = labels_paths(table)
    np.save(embeddings_path, vectors.astype(np.float32))
    meta_path.write_text(json.dumps({"root": str(root), "embedding_dim": vectors.shape[1]}))
    return table


def stored_scores(index_dir: Path) -> dict[str, tuple[float, int | None]]:
    """Path -> (score, suggestion) as the published index holds them."""
    meta = index_dir / read_manifest(index_dir)["dir"] / META_FILE
    with sqlite3.connect(f"file:{meta}?mode=ro", uri=True) as db:
        assert review_table.has_scores(db)
        rows = db.execute("SELECT i.path, r.score, r.suggestion FROM review r JOIN images i ON i.id = r.id").fetchall()
    return {path: (score, suggestion) for path, score, suggestion in rows}


def test_index_build_and_update_store_fresh_scores(tmp_path: Path) -> None:
    vectors, clusters, margins, mistakes = planted(seed=3)
    margins = margins.copy()
    table = write_table(tmp_path, vectors, clusters, margins)
    out = tmp_path / "index"
    build_index(IndexConfig(source=str(table), out=str(out), device="cpu"))
    assert read_manifest(out)["generation"] == 1  # the scores are published with the build, not after it
    scores = stored_scores(out)
    assert len(scores) == len(clusters)
    ranked = sorted(scores, key=lambda path: -scores[path][0])
    assert sorted(ranked[:len(mistakes)]) == [f"labels/img{i:04d}.png" for i in mistakes]

    # twelve new images of cluster 2 right on top of an honest image of cluster 0: after --update that old
    # image's neighbours have changed, so its stored score must have been recomputed
    honest = int(next(i for i in range(PER_CENTRE) if i not in mistakes))
    rng = np.random.default_rng(9)
    crowd = (vectors[honest] + 0.01 * rng.normal(size=(12, DIM))).astype(np.float32)
    more = write_table(tmp_path, np.concatenate([vectors, crowd]), np.concatenate([clusters, np.full(12, 2)]),
                       np.concatenate([margins, np.full(12, 0.9, np.float32)]), name="labels")
    assert more == table
    result = subprocess.run([sys.executable, "-m", "twist_core.cli", "index", str(table), "--update", "--out",
                             str(out), "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    after = stored_scores(out)
    assert len(after) == len(clusters) + 12
    old_path = f"labels/img{honest:04d}.png"
    # its neighbours went from all agreeing to all disagreeing: the neighbour term rose by (nearly) its weight
    assert after[old_path][0] - scores[old_path][0] > 0.8 * review.NEIGHBOUR_WEIGHT and after[old_path][1] == 2


def test_an_index_without_scores_opens_and_update_adds_them(tmp_path: Path) -> None:
    """An index an older twist built (no review table) opens; the app explains; ``--update`` adds the scores."""
    vectors, clusters, margins, _ = planted(seed=4)
    table = write_table(tmp_path, vectors, clusters, margins)
    rows, _ = read_labels(table)
    unit = normalized(vectors)
    ids = np.arange(len(rows), dtype=np.int64)
    faiss_index = build(IndexPlan("flat"), DIM, len(ids), lambda: iter([(ids, unit)]), None)
    out = tmp_path / "old-index"
    info = {"root": str(tmp_path / "images"), "dim": DIM, "kind": "flat", "metric": "cosine", "nlist": 0,
            "nprobe": 0, "pq_m": 0, "model": None}
    IndexWriter.create(out, faiss_index, rows, info, "cpu").close()  # what twist index wrote before the review
    opened = IndexWriter.open(out, "cpu")
    assert opened.size == len(rows) and opened.search_id(0, 3)
    opened.close()
    meta = out / read_manifest(out)["dir"] / META_FILE
    with sqlite3.connect(f"file:{meta}?mode=ro", uri=True) as db:
        assert not review_table.has_scores(db)
    result = subprocess.run([sys.executable, "-m", "twist_core.cli", "index", str(table), "--update", "--out",
                             str(out), "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(stored_scores(out)) == len(rows)
    generation = read_manifest(out)["generation"]
    result = update_index(IndexConfig(source=str(table), out=str(out), update=True, device="cpu"))
    assert (result.added, result.removed, result.relabelled) == (0, 0, None)
    assert read_manifest(out)["generation"] == generation  # nothing changed, scores present: nothing rewritten


# ---- the app's Review data path
@pytest.fixture
def workspace(app_bundle: dict[str, Path], tmp_path: Path):
    ws = Workspace(app_bundle["model"], app_bundle["index"], state_dir=tmp_path / "state")
    yield ws
    ws.close()


def test_review_pages_move_keep_and_undo(workspace: Workspace) -> None:
    items, total = workspace.review_page(0)
    assert total == workspace.index.size and items
    scores = [item.score for item in items]
    assert scores == sorted(scores, reverse=True)
    first, second = items[0], items[1]
    target = first.suggestion if first.suggestion is not None else (first.record.label + 1) % 4
    workspace.move([first.record.id], target)
    assert workspace.record(first.record.id).label == target
    workspace.keep([second.record.id])
    assert workspace.record(second.record.id).label == second.record.label
    items_after, total_after = workspace.review_page(0)
    assert total_after == total - 2
    assert {first.record.id, second.record.id}.isdisjoint(item.record.id for item in items_after)
    workspace.undo()  # the keep
    workspace.undo()  # the move
    restored, total_restored = workspace.review_page(0)
    assert total_restored == total and [i.record.id for i in restored] == [i.record.id for i in items]
    assert workspace.record(first.record.id).label == first.record.label


def test_review_of_an_index_without_scores_says_how_to_add_them(app_bundle: dict[str, Path], tmp_path: Path) -> None:
    index_dir = tmp_path / "index"
    shutil.copytree(app_bundle["index"], index_dir)
    meta = index_dir / read_manifest(index_dir)["dir"] / META_FILE
    with sqlite3.connect(meta) as db:  # as an index built before the review existed
        db.executescript("DROP TABLE review; DELETE FROM info WHERE key = 'review';")
    ws = Workspace(app_bundle["model"], index_dir, state_dir=tmp_path / "state")
    try:
        assert ws.overview()
        with pytest.raises(AppUserError, match="twist index --update"):
            ws.review_page(0)
    finally:
        ws.close()


def select_an_image_with_a_suggestion(page: Any) -> None:
    """Click the first page's images after the first until one has a suggested cluster (the move needs one)."""
    from playwright.sync_api import expect

    gallery = page.locator("#review-gallery button.thumbnail-item")
    for item in range(1, gallery.count()):
        gallery.nth(item).click()
        current = page.locator("#review-id input").input_value()
        expect(page.locator("#review-details")).to_contain_text(f"#{current}")
        if page.locator("#review-move-suggested").is_enabled():
            return


# ---- the Review view in a real browser
@needs_chromium
def test_review_view_in_chromium_keeps_moves_and_undoes(app_bundle: dict[str, Path], tmp_path: Path) -> None:
    from conftest import start_app_server, stop_app_server
    from playwright.sync_api import expect

    shots = tmp_path / "screenshots"
    shots.mkdir()
    process, url = start_app_server(app_bundle, tmp_path / "state")
    try:
        with chromium_page(1400, 1100) as page:
            page.goto(url)
            page.get_by_role("tab", name="Review").click()
            info = page.locator("#review-info")
            expect(info).to_contain_text("images to review")
            total = int(info.inner_text().split(" images")[0].replace(",", "").strip("* "))
            expect(page.locator("#review-details")).to_contain_text("review score")  # the first image is current
            page.screenshot(path=shots / "1-review.png", full_page=True)

            page.locator("#review-keep").click()
            expect(page.locator("#review-status")).to_contain_text("kept where they are")
            expect(info).to_contain_text(f"{total - 1:,} images to review")
            move = page.locator("#review-move-suggested")
            select_an_image_with_a_suggestion(page)
            expect(move).to_be_enabled()
            move.click()
            expect(page.locator("#review-status")).to_contain_text("moved to")
            expect(info).to_contain_text(f"{total - 2:,} images to review")
            after = page.locator("#review-id input").input_value()  # the next image became current
            expect(page.locator("#review-details")).to_contain_text(f"#{after}")
            expect(page.locator("#review-details")).to_contain_text("review score")
            page.screenshot(path=shots / "2-after-keep-and-move.png", full_page=True)
            page.locator("#review-undo").click()
            expect(page.locator("#review-status")).to_contain_text("undone")
            page.screenshot(path=shots / "3-undone.png", full_page=True)
    finally:
        stop_app_server(process)
    artifacts = keep_screenshots(shots, "review")
    assert len(list(artifacts.glob("*.png"))) == 3


def test_review_follows_an_index_update_while_the_app_runs(app_bundle: dict[str, Path], tmp_path: Path) -> None:
    index_dir = tmp_path / "index"
    shutil.copytree(app_bundle["index"], index_dir)
    ws = Workspace(app_bundle["model"], index_dir, state_dir=tmp_path / "state")
    try:
        items, total = ws.review_page(0)
        gone = items[0].record.id
        writer = IndexWriter.open(index_dir, "cpu")
        writer.remove([gone])  # an update: a new generation, whose stale score the queue must not show
        writer.close()
        after, after_total = ws.review_page(0)
        assert gone not in [i.record.id for i in after] and after_total == total - 1
        review_table.refresh_index(index_dir)
        assert ws.review_page(0)[1] == total - 1
    finally:
        ws.close()

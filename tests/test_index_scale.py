"""The index at scale, on small data: the kind follows N (thresholds as parameters), the compressed kind answers
every reader, recall is recorded at build time, and an update re-scores only what changed (crash-safe)."""

from __future__ import annotations

import functools
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np

from tests.test_index import REPO, clustered, exact_topk, write_labels
from twist_core.index import build as build_module
from twist_core.index import review_table
from twist_core.index.build import IndexConfig, build_index, update_index
from twist_core.index.image_index import IndexWriter, find_duplicates
from twist_core.index.metadata import FAULT_ENV, meta_path
from twist_core.knn_join import self_neighbours
from twist_core.vectors import build, plan_index


def test_the_kind_follows_n() -> None:
    kinds = [plan_index(n, 256, flat_max=100, compressed_min=1000).kind for n in (50, 100, 101, 999, 1000)]
    assert kinds == ["flat", "flat", "ivf", "ivf", "pcasq"]
    assert plan_index(1000, 256, flat_max=100, compressed_min=1000).pca_dim == 128
    assert plan_index(5000, 64, flat_max=100, compressed_min=1000).kind == "ivf"  # nothing to project away


def low_rank(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered vectors of a 32-d latent space mapped into ``dim`` plus small noise: a decaying spectrum, as
    trained embeddings have (isotropic noise in every dimension is what no projection can keep)."""
    latent, clusters = clustered(n, 32, 12, seed)
    mapping = np.random.default_rng(7).normal(size=(32, dim)).astype(np.float32)
    vectors = latent @ mapping + 0.05 * np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), clusters


def test_compressed_kind_answers_every_reader_and_records_recall(tmp_path: Path) -> None:
    vectors, clusters = low_rank(3000, 256)
    vectors[2999] = vectors[5] + 1e-3  # a planted near copy
    table = write_labels(tmp_path / "labels", vectors, clusters)
    build_index(IndexConfig(source=str(table), out=str(tmp_path / "ix"), device="cpu", kind="pcasq", nlist=24,
                            nprobe=8))
    index = IndexWriter.open(tmp_path / "ix", "cpu")
    info = index.info
    assert info["kind"] == "pcasq" and info["pca_dim"] == 128 and info["recall_queries"] == 200
    assert info["recall_at_10"] >= 0.9 and set(info["build_cpu_s"]) >= {"add", "review score", "recall"}
    _, want = exact_topk(vectors, vectors[:50], 10)
    got = [[h.id for h in row] for row in index.search_vectors(vectors[:50], k=10)]
    assert np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want, strict=True)]) >= 0.9
    in_cluster = index.search_vectors(vectors[:5], k=5, cluster=3)  # IDSelector through the projection
    assert all(h.cluster == 3 for row in in_cluster for h in row) and all(len(row) == 5 for row in in_cluster)
    assert index.search_id(5, k=1)[0].id == 2999  # reconstruct goes back through the projection
    assert any({h.id for h in group} >= {5, 2999} for group in find_duplicates(index, 0.99))  # range search
    assert index.remove([0, 1]) == 2 and IndexWriter.open(tmp_path / "ix", "cpu").size == 2998


def test_the_ivf_join_finds_the_exact_neighbours() -> None:
    vectors, _ = clustered(4000, 32, 20)
    index = plan_and_build(vectors)
    found = {int(q): set(row.tolist()) for batch, rows, _ in self_neighbours(index, np.arange(4000), 5)
             for q, row in zip(batch, rows, strict=True)}
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    exact = np.argsort(-sims, axis=1)[:, :5]
    assert len(found) == 4000
    assert np.mean([len(found[i] & set(exact[i].tolist())) / 5 for i in range(4000)]) >= 0.97


def plan_and_build(vectors: np.ndarray) -> faiss.Index:
    plan = plan_index(len(vectors), vectors.shape[1], "ivf", 40, 8)
    return build(plan, vectors.shape[1], len(vectors), lambda: iter([(np.arange(len(vectors)), vectors)]), vectors)


def review(index_dir: Path) -> dict[int, tuple[float, int | None, float]]:
    """id -> (score, suggestion, k-th neighbour similarity)."""
    db = sqlite3.connect(meta_path(index_dir))
    try:
        return {i: (s, g, k) for i, s, g, k in db.execute("SELECT id, score, suggestion, kth FROM review")}
    finally:
        db.close()


def test_an_update_rescores_only_what_changed_and_matches_a_full_rescore(tmp_path: Path) -> None:
    vectors, clusters = clustered(2030, 32, 8, spread=0.5)
    full = write_labels(tmp_path / "all", vectors, clusters, make_files=True)
    base = write_labels(tmp_path / "base", vectors[:2000], clusters[:2000])
    (tmp_path / "base" / "labels.meta.json").write_text((tmp_path / "all" / "labels.meta.json").read_text())
    build_index(IndexConfig(source=str(base), out=str(tmp_path / "ix"), device="cpu"))
    before = review(tmp_path / "ix")
    result = update_index(IndexConfig(source=str(full), out=str(tmp_path / "ix"), device="cpu", update=True))
    assert (result.added, result.removed) == (30, 0)
    writer = IndexWriter.open(tmp_path / "ix", "cpu")
    writer.update([], np.zeros((0, 32), np.float32), [3, 4, 5])  # and three images go
    writer.close()
    after = review(tmp_path / "ix")
    changed = {i for i in before if i in after and after[i] != before[i]}
    assert len(after) == 2027 and 0 < len(changed) < 300  # a few old images' lists changed, not all 2,000
    shutil.copytree(tmp_path / "ix", tmp_path / "full")
    review_table.refresh_index(tmp_path / "full")
    again = review(tmp_path / "full")
    assert max(abs(after[i][0] - again[i][0]) for i in again) <= 0.0025  # the documented tolerance
    assert sum(after[i][1] != again[i][1] for i in again) == 0


def test_a_tiny_index_grows_past_k_and_every_score_follows(tmp_path: Path) -> None:
    """Lists stored at 1 or 2 neighbours (an index of 2 or 3 images) are not read as k-long ones on an update:
    the images are scored again, as a rebuild scores them."""
    vectors, clusters = clustered(40, 16, 2, spread=0.3)
    full = write_labels(tmp_path / "all", vectors, clusters, make_files=True)
    for start in (1, 2, 3):
        base = write_labels(tmp_path / f"base{start}", vectors[:start], clusters[:start])
        (tmp_path / f"base{start}" / "labels.meta.json").write_text((tmp_path / "all" / "labels.meta.json").read_text())
        out = tmp_path / f"ix{start}"
        build_index(IndexConfig(source=str(base), out=str(out), device="cpu"))
        assert update_index(IndexConfig(source=str(full), out=str(out), device="cpu", update=True)).added == 40 - start
        build_index(IndexConfig(source=str(full), out=str(tmp_path / f"rebuilt{start}"), device="cpu"))
        updated, rebuilt = review(out), review(tmp_path / f"rebuilt{start}")
        assert updated.keys() == rebuilt.keys()
        assert max(abs(updated[i][0] - rebuilt[i][0]) for i in rebuilt) <= 0.0025


def test_a_killed_table_update_leaves_the_previous_generation(tmp_path: Path) -> None:
    vectors, clusters = clustered(420, 16, 4)
    full = write_labels(tmp_path / "all", vectors, clusters, make_files=True)
    base = write_labels(tmp_path / "base", vectors[:400], clusters[:400])
    (tmp_path / "base" / "labels.meta.json").write_text((tmp_path / "all" / "labels.meta.json").read_text())
    build_index(IndexConfig(source=str(base), out=str(tmp_path / "ix"), device="cpu"))
    before = review(tmp_path / "ix")
    command = [sys.executable, "-m", "twist_core.cli", "index", str(full), "--update", "--out", str(tmp_path / "ix")]
    for stage in ("meta-written", "index-written", "before-manifest"):
        done = subprocess.run(command, cwd=REPO, env={**os.environ, FAULT_ENV: stage}, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 75, done.stderr
        index = IndexWriter.open(tmp_path / "ix", "cpu")
        assert index.size == 400 == index._meta.count() and review(tmp_path / "ix") == before
        index.close()
    assert subprocess.run(command, cwd=REPO, capture_output=True, timeout=120).returncode == 0
    assert IndexWriter.open(tmp_path / "ix", "cpu").size == 420 and len(review(tmp_path / "ix")) == 420


def test_a_path_in_two_rows_is_refused_before_any_work(tmp_path: Path) -> None:
    """The index holds a path once: a repeated row is one line before training (at 1M the build took minutes to
    fail on SQLite's UNIQUE constraint), and an update's repeated new row likewise, the index untouched."""
    vectors, clusters = clustered(60, 16, 3)
    table = write_labels(tmp_path / "t", vectors, clusters, make_files=True)
    lines = table.read_text().splitlines(keepends=True)
    twice = tmp_path / "t" / "twice.csv"
    twice.write_text("".join([*lines[:6], lines[5], *lines[7:]]))  # row 6 repeats row 5's path (same row count)
    for suffix in (".embeddings.npy", ".meta.json"):
        shutil.copy(str(table).replace(".csv", suffix), str(twice).replace(".csv", suffix))
    command = [sys.executable, "-m", "twist_core.cli", "index", str(twice), "--out", str(tmp_path / "ix")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "is in two rows" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "ix" / "manifest.json").exists()
    base = write_labels(tmp_path / "base", vectors[:50], clusters[:50])
    shutil.copy(str(table).replace(".csv", ".meta.json"), tmp_path / "base" / "labels.meta.json")
    build_index(IndexConfig(source=str(base), out=str(tmp_path / "ix2"), device="cpu"))
    before = (tmp_path / "ix2" / "manifest.json").read_text()
    new = tmp_path / "t" / "new.csv"
    new.write_text("".join([*lines[:1], *lines[52:55], lines[53]]))
    np.save(str(new).replace(".csv", ".embeddings.npy"), np.concatenate([vectors[51:54], vectors[52:53]]))
    shutil.copy(str(table).replace(".csv", ".meta.json"), str(new).replace(".csv", ".meta.json"))
    update = subprocess.run([sys.executable, "-m", "twist_core.cli", "index", str(new), "--update", "--out",
                             str(tmp_path / "ix2")], capture_output=True, text=True, cwd=REPO)
    assert update.returncode == 2 and "is in two rows" in update.stderr and "Traceback" not in update.stderr
    assert (tmp_path / "ix2" / "manifest.json").read_text() == before


def test_an_index_grown_by_updates_past_flat_is_written_again_as_ivf(tmp_path: Path, monkeypatch) -> None:
    """Updates that take a flat index past its range (here 100 images) write it again as a build would choose it:
    the ids, metadata and scores stay, the kind, lists and recall are the new ones."""
    monkeypatch.setattr(build_module, "plan_index", functools.partial(plan_index, flat_max=100))
    vectors, clusters = low_rank(400, 64)
    full = write_labels(tmp_path / "all", vectors, clusters, make_files=True)
    base = write_labels(tmp_path / "base", vectors[:80], clusters[:80])
    (tmp_path / "base" / "labels.meta.json").write_text((tmp_path / "all" / "labels.meta.json").read_text())
    build_index(IndexConfig(source=str(base), out=str(tmp_path / "ix"), device="cpu"))
    before = IndexWriter.open(tmp_path / "ix", "cpu")
    assert before.kind == "flat" and before.info["kind_asked"] == "auto"
    paths = before.paths_by_id()
    before.close()
    assert update_index(IndexConfig(source=str(full), out=str(tmp_path / "ix"), device="cpu", update=True)).added == 320
    after = IndexWriter.open(tmp_path / "ix", "cpu")
    info = after.info
    assert after.kind == "ivf" and info["nlist"] == plan_index(400, 64, flat_max=100).nlist and after.size == 400
    assert {i: p for i, p in after.paths_by_id().items() if i in paths} == paths  # ids kept
    assert info["recall_at_10"] >= 0.9 and len(review(tmp_path / "ix")) == 400
    assert after.search_id(5, k=1)[0].id != 5 and after.search_vectors(vectors[5:6], k=1)[0][0].path == paths[5]
    after.close()

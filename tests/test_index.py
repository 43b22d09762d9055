"""The image index: exact and IVF search against NumPy, updates, crash safety, filters, duplicates, CLI."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from twist_core.index.build import IndexConfig, build_index
from twist_core.index.image_index import (
    IndexReader,
    IndexWriter,
    auto_threshold,
    find_duplicates,
    nearest_similarities,
)
from twist_core.index.metadata import FAULT_ENV, IndexChangedError, IndexUserError, meta_path
from twist_core.layout import CURATION_FILE

REPO = Path(__file__).resolve().parents[1]


def clustered(n: int, dim: int, centres: int, seed: int = 0,
              spread: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around random centres (how trained embeddings look) and each vector's centre."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centres, dim)).astype(np.float32)
    labels = rng.integers(0, centres, n)
    vectors = means[labels] + spread * rng.normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), labels


def write_labels(folder: Path, vectors: np.ndarray, clusters: np.ndarray, fmt: str = "csv",
                 errors: frozenset[int] = frozenset(), make_files: bool = False) -> Path:
    """A labels table in the ``twist label`` layout: T.<fmt>, T.embeddings.npy, T.meta.json."""
    root = folder / "images"
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, cluster in enumerate(clusters):
        path = f"c{cluster}/img{i:05d}.png"
        if make_files:
            (root / path).parent.mkdir(exist_ok=True)
            (root / path).write_bytes(b"")
        if i in errors:
            rows.append({"path": path, "cluster": "", "cluster_name": "", "confidence": "", "margin": "",
                         "topk": "", "error": "cannot decode"})
        else:
            conf = round(0.5 + 0.5 * ((i * 7919) % 1000) / 1000, 4)
            rows.append({"path": path, "cluster": int(cluster), "cluster_name": f"class{cluster}",
                         "confidence": conf, "margin": conf / 2, "topk": json.dumps([[int(cluster), conf]]),
                         "error": ""})
    table = folder / f"labels.{fmt}"
    if fmt == "csv":
        with open(table, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    embeddings = np.array(vectors, dtype=np.float32)
    embeddings[list(errors)] = 0
    np.save(folder / "labels.embeddings.npy", embeddings)
    meta = {"root": str(root), "model": None, "rows": len(rows)}
    (folder / "labels.meta.json").write_text(json.dumps(meta))
    return table


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = queries @ base.T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, top, axis=1), top


def build(tmp_path: Path, vectors: np.ndarray, clusters: np.ndarray, **options) -> IndexWriter:
    table = write_labels(tmp_path / "labels", vectors, clusters, make_files=options.pop("make_files", False))
    build_index(IndexConfig(source=str(table), out=str(tmp_path / "index"), device="cpu", **options))
    return IndexWriter.open(tmp_path / "index", device="cpu")


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twist_core.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=120)


def test_flat_search_equals_numpy_bruteforce(tmp_path: Path) -> None:
    vectors, clusters = clustered(3000, 32, 12)
    index = build(tmp_path, vectors, clusters)
    assert (index.kind, index.size, index.dim) == ("flat", 3000, 32)
    queries = np.random.default_rng(1).normal(size=(50, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    want_sims, want_ids = exact_topk(vectors, queries, 10)
    hits = index.search_vectors(queries * 3.0, k=10)  # scale must not matter: cosine
    np.testing.assert_array_equal([[h.id for h in row] for row in hits], want_ids)
    np.testing.assert_allclose([[h.similarity for h in row] for row in hits], want_sims, atol=1e-5)
    first = hits[0][0]
    assert first.path == f"c{clusters[first.id]}/img{first.id:05d}.png"
    assert first.abs_path == tmp_path / "labels" / "images" / first.path
    assert first.cluster == clusters[first.id] and first.cluster_name == f"class{clusters[first.id]}"


def test_ivf_recall_at_10(tmp_path: Path) -> None:
    vectors, clusters = clustered(20000, 64, 100, spread=0.5)
    index = build(tmp_path, vectors, clusters, kind="ivf")
    assert index.kind == "ivf" and index.info["nlist"] > 1 and index.nprobe < index.info["nlist"]
    queries = vectors[np.random.default_rng(2).choice(20000, 300, replace=False)]
    queries = queries + 0.2 * np.random.default_rng(3).normal(size=queries.shape).astype(np.float32)
    _, want = exact_topk(vectors, queries / np.linalg.norm(queries, axis=1, keepdims=True), 10)
    got = [[h.id for h in row] for row in index.search_vectors(queries, k=10)]
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want, strict=True)])
    assert recall >= 0.95, recall


def test_rows_with_errors_are_skipped_and_jsonl_tables_work(tmp_path: Path) -> None:
    vectors, clusters = clustered(200, 16, 4)
    table = write_labels(tmp_path, vectors, clusters, fmt="jsonl", errors=frozenset({3, 50}))
    index = IndexWriter.open(build_index(IndexConfig(source=str(table), out=str(tmp_path / "ix"))), "cpu")
    assert index.size == 198
    assert set(index.ids_for_paths([f"c{clusters[3]}/img00003.png", f"c{clusters[4]}/img00004.png"]).keys()) \
        == {f"c{clusters[4]}/img00004.png"}


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_add_and_remove_keep_ids_and_metadata_consistent(tmp_path: Path, kind: str) -> None:
    vectors, clusters = clustered(2000, 32, 8)
    index = build(tmp_path, vectors, clusters, kind=kind, nlist=16, nprobe=16)
    before = {i: index.get(i).path for i in (0, 1, 500, 1999)}
    extra, _ = clustered(30, 32, 8, seed=9)
    new_ids = index.add([{"path": f"new/{i}.png", "cluster": 1, "confidence": 0.9} for i in range(30)], extra)
    np.testing.assert_array_equal(new_ids, np.arange(2000, 2030))
    assert index.remove([0, "new/3.png", "not/there.png", 123456]) == 2
    for reopened in (index, IndexWriter.open(tmp_path / "index", "cpu")):
        assert reopened.size == 2028 == reopened._meta.count()
        assert {i: reopened.get(i).path for i in (1, 500, 1999)} == {i: before[i] for i in (1, 500, 1999)}
        with pytest.raises(IndexUserError):
            reopened.get(0)
        np.testing.assert_allclose(reopened.vector(2005), extra[5], atol=1e-6)
        results = reopened.search_vectors(np.vstack([vectors[:20], extra]), k=50)
        returned = {h.id for row in results for h in row}
        assert 0 not in returned and 2003 not in returned
        assert reopened.search_id(2010, k=1)[0].id != 2010
    # a re-added path gets a new id; the old one is gone, not duplicated
    replaced = index.add(["new/4.png"], extra[4:5] + 0.01)
    assert replaced[0] == 2030 and index.ids_for_paths(["new/4.png"]) == {"new/4.png": 2030}
    assert index.size == 2028
    assert len(list((tmp_path / "index").glob("gen-*"))) == 1  # old generations are cleaned up


def test_ivfpq_compressed_index_searches_and_updates(tmp_path: Path) -> None:
    vectors, clusters = clustered(3000, 32, 20)
    index = build(tmp_path, vectors, clusters, kind="ivfpq", nlist=32, nprobe=8, pq_m=16)
    assert index.kind == "ivfpq" and index.info["pq_m"] == 16
    _, want = exact_topk(vectors, vectors[:100], 10)
    got = [[h.id for h in row] for row in index.search_vectors(vectors[:100], k=10)]
    assert np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want, strict=True)]) > 0.6
    assert index.remove([0, 1]) == 2 and IndexWriter.open(tmp_path / "index", "cpu").size == 2998


@pytest.mark.parametrize("stage", ["meta-written", "index-written", "before-manifest"])
def test_crash_during_update_leaves_previous_index_usable(tmp_path: Path, stage: str) -> None:
    vectors, clusters = clustered(1000, 16, 5)
    index = build(tmp_path, vectors, clusters)
    expected = [h.id for h in index.search_vectors(vectors[:1], k=20)[0]]
    script = ("import numpy as np; from twist_core.index.image_index import IndexWriter; "
              f"ix = IndexWriter.open({str(tmp_path / 'index')!r}, 'cpu'); "
              "ix.add([f'x/{i}.png' for i in range(5)], np.ones((5, 16), np.float32)); ix.remove([0, 1, 2])")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, FAULT_ENV: stage},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 75, done.stderr  # killed at the fault point, mid-update
    after = IndexWriter.open(tmp_path / "index", "cpu")
    assert after.size == 1000 == after._meta.count() and after.generation == index.generation
    assert [h.id for h in after.search_vectors(vectors[:1], k=20)[0]] == expected
    assert not after.ids_for_paths(["x/0.png"])
    after.remove([7])  # the next update succeeds and sweeps the half-written generation away
    assert IndexWriter.open(tmp_path / "index", "cpu").size == 999
    left = [p.name for p in (tmp_path / "index").iterdir() if "gen-" in p.name]
    assert left == [f"gen-{after.generation:06d}"]


def test_crash_after_manifest_swap_shows_the_new_state(tmp_path: Path) -> None:
    vectors, clusters = clustered(300, 16, 3)
    build(tmp_path, vectors, clusters)
    script = ("from twist_core.index.image_index import IndexWriter; "
              f"IndexWriter.open({str(tmp_path / 'index')!r}, 'cpu').remove([0, 1])")
    env = {**os.environ, FAULT_ENV: "after-manifest"}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 75, done.stderr
    assert IndexWriter.open(tmp_path / "index", "cpu").size == 298


def test_concurrent_writer_is_refused_and_state_reloaded(tmp_path: Path) -> None:
    vectors, clusters = clustered(300, 16, 3)
    first = build(tmp_path, vectors, clusters)
    second = IndexWriter.open(tmp_path / "index", "cpu")
    first.remove([5])
    with pytest.raises(IndexChangedError):
        second.remove([6])
    assert second.size == 299 and second._cpu.ntotal == second._meta.count()  # memory matches disk again
    second.remove([6])
    assert IndexWriter.open(tmp_path / "index", "cpu").size == 298


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_cluster_filter(tmp_path: Path, kind: str) -> None:
    vectors, clusters = clustered(3000, 32, 6)
    clusters = clusters.copy()
    clusters[[10, 20, 30]] = 99  # a cluster far smaller than k, scattered over the space
    index = build(tmp_path, vectors, clusters, kind=kind, nlist=32, nprobe=2)
    queries = vectors[:5]
    for cluster in (2, 99):
        members = np.flatnonzero(clusters == cluster)
        _, want = exact_topk(vectors[members], queries, 10)
        rows = index.search_vectors(queries, k=10, cluster=cluster)
        for row, wanted in zip(rows, want, strict=True):
            assert {h.cluster for h in row} == {cluster}
            assert len(row) == min(10, len(members))
            if kind == "flat" or cluster == 99:
                assert [h.id for h in row] == list(members[wanted])
    assert [h.id for h in index.search_id(10, k=5, cluster=99)] in ([20, 30], [30, 20])


def test_duplicates_finds_planted_near_copies(tmp_path: Path) -> None:
    vectors, clusters = clustered(2000, 64, 10, spread=1.0)
    rng = np.random.default_rng(5)
    planted = [[100, 1500], [200, 1600, 1700], [300, 1800]]
    for group in planted:
        for copy in group[1:]:
            noisy = vectors[group[0]] + 0.02 * rng.normal(size=64).astype(np.float32)
            vectors[copy] = noisy / np.linalg.norm(noisy)
    index = build(tmp_path, vectors, clusters)
    groups = find_duplicates(index, threshold=0.97)
    assert sorted(sorted(h.id for h in g) for g in groups) == sorted(sorted(g) for g in planted)
    assert len(groups[0]) == 3 and all(h.similarity >= 0.97 for g in groups for h in g)
    assert find_duplicates(index, threshold=0.9999) == []
    threshold, stats = auto_threshold(nearest_similarities(index))  # the default of twist duplicates
    assert stats["images_measured"] == 2000 and stats["nearest_similarity_median"] < threshold < 1.0
    assert sorted(sorted(h.id for h in g) for g in find_duplicates(index, threshold)) == sorted(map(sorted, planted))


def test_auto_threshold_flags_nothing_without_copies_and_little_on_tiny_indexes(tmp_path: Path) -> None:
    vectors, clusters = clustered(2000, 64, 10, spread=1.0)
    index = build(tmp_path / "plain", vectors, clusters)
    nearest = nearest_similarities(index)
    exact = vectors @ vectors.T
    np.fill_diagonal(exact, -2.0)
    np.testing.assert_allclose(nearest, exact.max(axis=1), atol=1e-5)  # FAISS gives each image's nearest other
    threshold, _ = auto_threshold(nearest)
    assert len(find_duplicates(index, threshold)) <= 5  # no copies planted: almost nothing passes
    pair = build(tmp_path / "pair", vectors[:2], clusters[:2])
    assert find_duplicates(pair, auto_threshold(nearest_similarities(pair))[0]) == []  # two unrelated images
    assert auto_threshold(np.array([np.nan]))[0] == 1.0  # one image: nothing to compare


def test_records_paging_and_cluster_summary(tmp_path: Path) -> None:
    vectors, clusters = clustered(500, 16, 4)
    index = build(tmp_path, vectors, clusters)
    members = np.flatnonzero(clusters == 2)
    confidences = {i: index.get(int(i)).confidence for i in members}
    ordered = sorted(members, key=lambda i: (-confidences[i], i))
    page = index.records(cluster=2, offset=5, limit=10)
    assert [h.id for h in page] == [int(i) for i in ordered[5:15]]
    lowest = index.records(cluster=2, descending=False, limit=3, min_conf=0.6, max_conf=0.9)
    assert all(0.6 <= h.confidence <= 0.9 for h in lowest)
    assert lowest[0].confidence == min(c for c in confidences.values() if c >= 0.6)
    summary = index.cluster_summary()
    assert [s["cluster"] for s in summary] == index.cluster_ids() == [0, 1, 2, 3]
    assert [s["size"] for s in summary] == np.bincount(clusters).tolist()
    with pytest.raises(IndexUserError):
        index.records(order_by="path; DROP TABLE images")


def test_remove_missing_files(tmp_path: Path) -> None:
    vectors, clusters = clustered(100, 16, 2)
    index = build(tmp_path, vectors, clusters, make_files=True)
    for i in (4, 40):
        index.get(i).abs_path.unlink()
    assert index.remove_missing() == 2 and index.size == 98


def test_dimension_mismatch_and_missing_index_are_user_errors(tmp_path: Path) -> None:
    vectors, clusters = clustered(100, 16, 2)
    index = build(tmp_path, vectors, clusters)
    with pytest.raises(IndexUserError, match="dimension"):
        index.search_vectors(np.ones((1, 8), np.float32))
    with pytest.raises(IndexUserError, match="no index"):
        IndexWriter.open(tmp_path / "nowhere", "cpu")


def test_cli_index_search_duplicates(tmp_path: Path) -> None:
    vectors, clusters = clustered(400, 16, 4)
    vectors[399] = vectors[0]
    table = write_labels(tmp_path / "labels", vectors, clusters)
    built = run_cli("index", str(table), "--out", str(tmp_path / "ix"), "--device", "cpu")
    assert built.returncode == 0, built.stderr
    assert "400 images, 16-d, flat index" in built.stdout
    index = str(tmp_path / "ix")
    found = run_cli("search", index, "--id", "0", "-k", "3", "--json", str(tmp_path / "s.json"))
    assert found.returncode == 0, found.stderr
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["hits"][0]["id"] == 399 and len(result["hits"]) == 3
    assert result["hits"][0]["path"] in found.stdout
    dups = run_cli("duplicates", index, "--threshold", "0.999", "--json", str(tmp_path / "d.json"))
    assert dups.returncode == 0, dups.stderr
    groups = json.loads((tmp_path / "d.json").read_text())["groups"]
    assert [sorted(h["id"] for h in g) for g in groups] == [[0, 399]] and "1 groups" in dups.stdout
    for args in (["search", str(tmp_path / "missing"), "--id", "1"], ["search", index, "--id", "9999"],
                 ["duplicates", index, "--threshold", "2"], ["index", str(tmp_path / "nope.csv")],
                 ["search", index, str(tmp_path / "nope.png")]):
        failed = run_cli(*args)
        assert failed.returncode == 2, failed.stderr  # every user error, every command
        assert "Traceback" not in failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1 and "error:" in failed.stderr


def test_index_a_folder_search_by_image_and_update_with_the_onnx_model(tmp_path: Path, tiny_run: Path,
                                                                       shapes_folder: Path) -> None:
    try:
        from twist_core.deploy.export import ExportConfig, export_model
        from twist_core.deploy.infer import OnnxModel
    except ImportError as error:
        pytest.skip(f"ONNX export/inference not available yet: {error}")
    model_path = export_model(ExportConfig(run=str(tiny_run), out=str(tmp_path / "m.onnx")))
    model = OnnxModel(model_path, device="cpu")
    folder = tmp_path / "photos"
    shutil.copytree(shapes_folder, folder)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    held_back = {f: (folder / f).read_bytes() for f in files[-3:]}
    for f in held_back:
        (folder / f).unlink()
    build_index(IndexConfig(source=str(folder), model=str(model_path), out=str(tmp_path / "ix"),
                            device="cpu"))
    index = IndexWriter.open(tmp_path / "ix", "cpu")
    assert index.size == len(files) - 3 and index.root == folder.resolve()
    top = index.search_image(model, folder / files[7], k=3)[0]
    assert top.path == files[7] and top.similarity == pytest.approx(1.0, abs=1e-4)
    for f, data in held_back.items():
        (folder / f).write_bytes(data)
    (folder / files[0]).unlink()
    updated = run_cli("index", "--update", "--out", str(tmp_path / "ix"), "--device", "cpu")
    assert updated.returncode == 0 and "added 3, removed 1" in updated.stdout, updated.stderr
    cli = run_cli("search", str(tmp_path / "ix"), str(folder / files[-1]), "-k", "2", "--device", "cpu")
    assert cli.returncode == 0, cli.stderr
    assert files[-1] in cli.stdout.splitlines()[1]


def test_search_and_duplicates_show_the_name_given_in_the_app(tmp_path: Path) -> None:
    """Names live in the model card and the app's curation store: a rename in the app reaches the commands."""
    from twist_core.curate.curation import CurationStore
    from twist_core.curate.store_file import CuratedNames

    vectors, clusters = clustered(200, 16, 4)
    vectors[1], clusters[1] = vectors[0], clusters[0]  # one pair of duplicates
    build(tmp_path, vectors, clusters).close()
    index_dir, cluster = tmp_path / "index", int(clusters[0])
    names = [f"class{c}" for c in range(4)]
    store = CurationStore(index_dir / CURATION_FILE, meta_path(index_dir), names)  # the app's default state dir
    before = run_cli("search", str(index_dir), "--id", "0", "-k", "3", "--device", "cpu")
    assert before.returncode == 0 and f"{cluster} class{cluster}" in before.stdout, before.stderr
    store.rename(cluster, "retrievers")  # the store stays open, as in a running app
    after = run_cli("search", str(index_dir), "--id", "0", "-k", "3", "--device", "cpu", "--json",
                    str(tmp_path / "hits.json"))
    assert after.returncode == 0 and f"{cluster} retrievers" in after.stdout, after.stderr
    assert f"class{cluster}" not in after.stdout
    assert json.loads((tmp_path / "hits.json").read_text())["hits"][0]["cluster_name"] == "retrievers"
    twins = run_cli("duplicates", str(index_dir), "--threshold", "0.9999", "--device", "cpu")
    assert twins.returncode == 0 and f"{cluster} retrievers" in twins.stdout, twins.stderr
    assert IndexReader.open(index_dir, "cpu").cluster_names()[cluster] == f"class{cluster}", "the card's alone"
    reader = IndexReader.open(index_dir, "cpu", CuratedNames(index_dir))  # the names a caller passes
    assert reader.cluster_names()[cluster] == "retrievers" and reader.get(0).cluster_name == "retrievers"
    store.undo()
    assert reader.get(0).cluster_name == f"class{cluster}"  # a running reader follows the store
    store.close()

    elsewhere = tmp_path / "state"  # the app started with --state-dir
    other = CurationStore(elsewhere / CURATION_FILE, meta_path(index_dir), names)
    other.rename(cluster, "hounds")
    other.close()
    moved = run_cli("search", str(index_dir), "--id", "0", "-k", "1", "--device", "cpu", "--state-dir", str(elsewhere))
    assert moved.returncode == 0 and f"{cluster} hounds" in moved.stdout, moved.stderr


def test_a_reader_only_reads(tmp_path: Path) -> None:
    vectors, clusters = clustered(50, 8, 2)
    build(tmp_path, vectors, clusters).close()
    reader = IndexReader.open(tmp_path / "index", "cpu")
    assert reader.search_id(0, k=2) and not hasattr(reader, "add") and not hasattr(reader, "remove")

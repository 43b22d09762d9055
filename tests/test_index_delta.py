"""An update writes a step beside the hard-linked base; readers replay it into the index a full write would give,
a chain of steps merges into a new base past a share of the images, and a killed update leaves the previous one."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from tests.test_index import REPO, clustered, run_cli, write_labels
from twist_core.index import delta, review_table
from twist_core.index.build import IndexConfig, build_index
from twist_core.index.image_index import IndexReader, IndexWriter
from twist_core.index.metadata import FAULT_ENV, meta_path
from twist_core.layout import INDEX_FILE, META_FILE
from twist_core.vectors import normalized


def built(tmp_path: Path, n: int = 600, kind: str = "ivf") -> tuple[Path, np.ndarray]:
    vectors, clusters = clustered(n + 60, 32, 5)
    table = write_labels(tmp_path / "labels", vectors[:n], clusters[:n])
    out = tmp_path / "ix"
    build_index(IndexConfig(source=str(table), out=str(out), device="cpu", kind=kind, nlist=8, nprobe=8))
    return out, vectors


def generation(index_dir: Path) -> Path:
    return meta_path(index_dir).parent


def base_inode(index_dir: Path) -> int:
    return os.stat(generation(index_dir) / INDEX_FILE).st_ino


def contents(index: faiss.Index) -> tuple[list[bytes], np.ndarray]:
    """Every inverted list's ids and codes in order, and every stored vector: what searches read (the direct map's
    hash table serialises in an order of its own, so bytes of the whole index would differ for nothing)."""
    ivf = faiss.extract_index_ivf(index)
    lists, ids = [], []
    for number in range(ivf.nlist):
        size = ivf.invlists.list_size(number)
        ids.append(faiss.rev_swig_ptr(ivf.invlists.get_ids(number), size).copy())
        lists.append(ids[-1].tobytes() + faiss.rev_swig_ptr(ivf.invlists.get_codes(number), size * ivf.code_size)
                     .tobytes())
    ids = np.sort(np.concatenate(ids))
    return lists, index.reconstruct_batch(ids)


def same_as_written(writer: IndexWriter) -> None:
    """A fresh reader (base + steps) holds the very lists and vectors a full write of the writer's index would."""
    reader = IndexReader.open(writer.index_dir, "cpu")
    (got, got_vectors), (want, want_vectors) = contents(reader._cpu), contents(writer._cpu)
    assert got == want and np.array_equal(got_vectors, want_vectors)
    assert reader.size == writer.size == reader._meta.count()
    reader.close()


@pytest.mark.parametrize("kind", ["ivf", "pcasq"])
def test_an_update_writes_a_step_beside_the_linked_base(tmp_path: Path, kind: str) -> None:
    out, vectors = built(tmp_path, kind=kind)
    writer = IndexWriter.open(out, "cpu")
    before = base_inode(out)
    full = faiss.read_index(str(generation(out) / INDEX_FILE))  # the same changes, each vector encoded anew
    added = writer.add([f"new/{i}.png" for i in range(20)], vectors[600:620])
    writer.remove([3, 4, 5, 605])  # base images and one the step just added
    full.add_with_ids(normalized(vectors[600:620]), added)
    full.remove_ids(np.array([3, 4, 5, 605], np.int64))
    folder = generation(out)
    assert base_inode(out) == before and [p.name for p in delta.step_files(folder)] == \
        [f"delta-{writer.generation - 1:06d}.npz", f"delta-{writer.generation:06d}.npz"]
    assert os.stat(folder / INDEX_FILE).st_nlink == 1  # the older generations went, the base stayed
    assert {p.name for p in folder.iterdir()} - {p.name for p in delta.step_files(folder)} == \
        {INDEX_FILE, META_FILE}  # no journal beside the published metadata: the next update copies the file
    same_as_written(writer)
    reader = IndexReader.open(out, "cpu")
    (got, got_vectors), (want, want_vectors) = contents(reader._cpu), contents(full)
    assert got == want and np.array_equal(got_vectors, want_vectors)
    found = [[(h.id, h.similarity) for h in row] for row in reader.search_vectors(vectors[600:620], k=5)]
    assert found == [[(h.id, h.similarity) for h in row] for row in writer.search_vectors(vectors[600:620], k=5)]
    assert found[10][0][0] == 610
    assert np.array_equal(reader.vector(610), writer.vector(610)) and reader.size == 600 + 20 - 4


def test_a_chain_of_updates_merges_into_a_new_base(tmp_path: Path) -> None:
    out, vectors = built(tmp_path, n=500)
    writer = IndexWriter.open(out, "cpu")
    first = base_inode(out)
    for round_, start in enumerate(range(500, 560, 20)):  # 20, 40, then 60 > 10 % of 560 images: merged
        writer.add([f"new/{i}.png" for i in range(start, start + 20)], vectors[start:start + 20])
        steps = delta.step_files(generation(out))
        assert (base_inode(out) == first, len(steps)) == ((True, round_ + 1) if round_ < 2 else (False, 0))
        same_as_written(writer)
    merged = base_inode(out)
    writer.remove([0])
    assert base_inode(out) == merged and len(delta.step_files(generation(out))) == 1
    same_as_written(writer)


@pytest.mark.parametrize("stage", ["meta-written", "index-written", "before-manifest"])
def test_a_killed_step_leaves_the_previous_generation(tmp_path: Path, stage: str) -> None:
    out, vectors = built(tmp_path, n=300)
    writer = IndexWriter.open(out, "cpu")
    writer.add(["new/a.png"], vectors[300:301])  # the previous generation already has a step
    expected = contents(writer._cpu)
    script = ("import numpy as np; from twist_core.index.image_index import IndexWriter; "
              f"IndexWriter.open({str(out)!r}, 'cpu').add(['new/b.png'], np.ones((1, 32), np.float32))")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, FAULT_ENV: stage},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 75, done.stderr
    after = IndexWriter.open(out, "cpu")
    assert after.generation == writer.generation and after.size == 301 == after._meta.count()
    got = contents(after._cpu)
    assert got[0] == expected[0] and np.array_equal(got[1], expected[1])
    after.remove([0])  # the next update sweeps the half-written folder (and its links) away
    assert [p.name for p in out.iterdir() if "gen-" in p.name] == [generation(out).name]
    assert os.stat(generation(out) / INDEX_FILE).st_nlink == 1
    same_as_written(after)


def hits(result: dict) -> list:
    return [(h["id"], round(h["similarity"], 5)) for h in result["hits"]]


def test_commands_read_a_delta_generation_as_a_full_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, vectors = built(tmp_path, n=400)
    vectors[420] = vectors[7]  # an added near copy of a base image
    full = tmp_path / "full"
    shutil.copytree(out, full)
    for folder, share in ((out, delta.MERGE_SHARE), (full, 0.0)):  # the same update, as a step and whole
        monkeypatch.setattr(delta, "MERGE_SHARE", share)
        IndexWriter.open(folder, "cpu").update([{"path": f"new/{i}.png", "cluster": 1, "cluster_name": "class1",
                                                 "confidence": 0.9, "margin": 0.5} for i in range(400, 430)],
                                               vectors[400:430], gone=[1, 2])
    monkeypatch.undo()  # the refreshes below keep the usual share
    assert len(delta.step_files(generation(out))) == 1 and not delta.step_files(generation(full))
    answers = {}
    for folder in (out, full):
        json_of = {name: tmp_path / f"{folder.name}-{name}.json" for name in ("search", "dups", "merges")}
        for args in (["search", str(folder), "--id", "7", "-k", "5", "--json", str(json_of["search"])],
                     ["duplicates", str(folder), "--threshold", "0.999", "--json", str(json_of["dups"])],
                     ["suggest-merges", str(folder), "--json", str(json_of["merges"])]):
            done = run_cli(*args)
            assert done.returncode == 0, done.stderr
        result = {name: json.loads(path.read_text()) for name, path in json_of.items()}
        review_table.refresh_index(folder)
        with sqlite3.connect(meta_path(folder)) as db:
            scores = db.execute("SELECT id, round(score, 6), suggestion FROM review ORDER BY id").fetchall()
        answers[folder] = (hits(result["search"]), [sorted(h["id"] for h in g) for g in result["dups"]["groups"]],
                           result["merges"].get("merges"), scores)
    assert answers[out] == answers[full] and [7, 420] in answers[out][1]
    assert len(delta.step_files(generation(out))) == 1  # the refresh linked the step, wrote no other

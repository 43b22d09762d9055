"""Concurrent curation: two real processes, several threads each, on the same images and clusters.

Every action must log exactly what it overwrote, so undoing every entry (newest first) returns the store to
the state before the hammering; merges at the same moment must never leave a chain no dropdown can select.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from twist_core.curate.curation import EXCLUDED, CurationError, CurationStore
from twist_core.index.image_index import IndexWriter
from twist_core.index.metadata import read_manifest
from twist_core.layout import META_FILE

REPO = Path(__file__).resolve().parents[2]
N_CLUSTERS = 7
N_IMAGES = 28

WORKER = r"""
import json, random, sys, threading, time
from twist_core.curate.curation import CurationError, CurationStore

store_path, meta_path, seed, threads, actions, start_at, mode = sys.argv[1:]
names = [f"c{i}" for i in range(7)]
store = CurationStore(store_path, meta_path, names)
done = {"move": 0, "merge": 0, "rename": 0, "undo": 0, "refused": 0}
lock = threading.Lock()

def hammer(number):
    rng = random.Random(int(seed) * 100 + number)
    for _ in range(int(actions)):
        kind = rng.choice(["move", "move", "merge", "rename", "undo"])
        try:
            if kind == "move":
                store.move(rng.sample(range(28), rng.randint(1, 4)), rng.choice([-1, *range(7)]))
            elif kind == "merge":
                store.merge(rng.sample(range(7), rng.randint(1, 2)), rng.randrange(7))
            elif kind == "rename":
                store.rename(rng.randrange(7), rng.choice(["cats", "dogs", "cars", "boats", "x", "y"]))
            else:
                store.undo()
        except CurationError:
            kind = "refused"
        with lock:
            done[kind] += 1

def merges():
    pair = [([4], 5), ([5], 6)][int(seed) % 2]
    store.merge(*pair)
    done["merge"] += 1

while time.time() < float(start_at):
    time.sleep(0.001)
if mode == "merges":
    merges()
else:
    workers = [threading.Thread(target=hammer, args=(n,)) for n in range(int(threads))]
    for w in workers: w.start()
    for w in workers: w.join()
store.close()
print(json.dumps(done))
"""


@pytest.fixture
def curated(tmp_path: Path) -> dict:
    """A real index (FAISS + metadata) of 28 images in 7 clusters, and a store with some curation already."""
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(N_IMAGES, 8)).astype(np.float32)
    faiss.normalize_L2(vectors)
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(8))
    flat.add_with_ids(vectors, np.arange(N_IMAGES, dtype=np.int64))
    rows = [{"path": f"img{i:02d}.png", "cluster": i % N_CLUSTERS, "cluster_name": f"c{i % N_CLUSTERS}",
             "confidence": 0.5 + i / 100} for i in range(N_IMAGES)]
    index_dir = tmp_path / "ix"
    IndexWriter.create(index_dir, flat, rows, {"root": str(tmp_path), "dim": 8, "kind": "flat", "nprobe": 0},
                      "cpu").close()
    meta = index_dir / read_manifest(index_dir)["dir"] / META_FILE
    return {"store": tmp_path / "curation.sqlite", "meta": meta}


def open_store(curated: dict) -> CurationStore:
    return CurationStore(curated["store"], curated["meta"], [f"c{i}" for i in range(N_CLUSTERS)])


def state(store: CurationStore) -> dict:
    """Everything curation changes: names, merges, moves."""
    return {table: sorted(store._query(f"SELECT * FROM {table}")) for table in ("names", "merges", "overrides")}


def log_size(store: CurationStore) -> int:
    return store._query("SELECT COUNT(*) FROM undo_log")[0][0]


def run_workers(curated: dict, mode: str, seeds: list[int], threads: int = 1, actions: int = 0) -> list[dict]:
    start_at = time.time() + 1.5  # both processes have imported everything and wait for the same moment
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(curated["store"]), str(curated["meta"]), str(seed),
                               str(threads), str(actions), str(start_at), mode],
                              cwd=REPO, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for seed in seeds]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def assert_every_label_selectable(store: CurationStore) -> None:
    merges = dict(store._query("SELECT cluster, into_cluster FROM merges"))
    assert not set(merges.values()) & set(merges), f"a merge chain: {merges}"
    for record in store.iter_records():
        assert record.label == EXCLUDED or record.label not in merges, f"{record} has a merged-away label"


def test_two_processes_of_threads_log_exact_undo_state(curated: dict) -> None:
    store = open_store(curated)
    store.rename(2, "planes")
    store.merge([3], 1)
    store.move([0, 5, 9], 4)
    store.move([12], EXCLUDED)
    # Curation from an earlier session, with no undo history left: the hammer's own undos can then only pop
    # its own actions. (With these four entries still logged, an early undo that outran the applied actions
    # popped one of them, and "undo back to four entries" stopped at the right count but the wrong entries.)
    store._db.execute("DELETE FROM undo_log")
    original = state(store)

    done = run_workers(curated, "hammer", seeds=[1, 2], threads=4, actions=40)
    applied = sum(d["move"] + d["merge"] + d["rename"] for d in done)
    undone = sum(d["undo"] for d in done)
    assert applied > 100 and undone > 20, done
    assert_every_label_selectable(store)
    assert log_size(store) == applied - undone

    for _ in range(applied - undone):
        store.undo()
        assert_every_label_selectable(store)
    with pytest.raises(CurationError, match="nothing to undo"):
        store.undo()
    assert state(store) == original
    store.close()


def test_chained_merges_at_the_same_moment_end_in_one_selectable_cluster(curated: dict) -> None:
    store = open_store(curated)
    four = [r.id for r in store.iter_records() if r.predicted == 4]
    for attempt in range(6):
        run_workers(curated, "merges", seeds=[attempt, attempt + 1])  # 4 -> 5 and 5 -> 6, started together
        labels = {r.id: r.label for r in store.iter_records()}
        assert {labels[i] for i in four} == {6}, f"attempt {attempt}: cluster 4's images are not in 6"
        assert_every_label_selectable(store)
        assert {c["cluster"] for c in store.summary()} == set(range(N_CLUSTERS)) - {4, 5}
        assert store.count(6) == sum(1 for label in labels.values() if label == 6)
        store.undo()
        store.undo()
        assert state(store) == {"names": [], "merges": [], "overrides": []}
    with pytest.raises(CurationError, match="nothing to undo"):
        store.undo()
    store.close()

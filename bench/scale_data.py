"""Synthetic labels tables in exactly the format ``twist label`` writes, for the scale bench (``bench.scale``).

A table of N rows is ``labels.csv`` + row-aligned ``labels.embeddings.npy`` (float16, 1,024-d) +
``labels.meta.json`` + an empty ``labels.skipped.txt``, written with the library's own writers
(:func:`twist_core.label.table.write_table`, :func:`~twist_core.label.table.label_rows`,
:func:`~twist_core.label.table.labels_meta`) and naming the shipped demo model (1,024-d, 10 clusters), so that
``twist index`` and ``twist app`` take it as they take a real one. The ``review_score`` column is left empty,
as in tables written before the score: computing it is the labeller's costliest step and the index scores again.

Vectors: 10 clusters (the largest a third of the rows, the others decaying by 0.75), each with 100 sub-centres in
a 64-d latent space whose axes decay as 1/sqrt(rank) (a realistic spectrum), mapped to 1,024-d by a fixed random
matrix, plus small isotropic noise; 0.3 % of the rows are near-duplicates of another row. The probabilities
are a softmax of the latent distances to the cluster centres, so cluster, confidence, margin and top-k agree
with the vectors. Paths are ``pNN/NNN/iNNNNNNN.png`` (1,000 files a folder) under one files folder, hard links
to a few real PNGs, made once in the cache and reused (1M links take about a minute).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import DATA, REPO
from twist_core.io_utils import file_sha256
from twist_core.label.table import label_rows, labels_meta, labels_paths, skipped_path, write_table

MODEL = REPO / "models" / "demo" / "model.onnx"
DIM, LATENT, CLUSTERS, SUBCENTRES = 1024, 64, 10, 100
CHUNK = 50_000  # rows generated at once: ~200 MB of float32 vectors
PER_FOLDER = 1000
LINKS_PER_SOURCE = 100_000  # files numbered alike share a source copy: 12,500 links each
VERSION = 1  # bump when the generator changes: cached tables of another version are made again


@dataclass(frozen=True)
class Spec:
    """What a cached table was made from; a table is reused only when its spec is the same."""

    rows: int
    seed: int
    first: int = 0  # global number of the first row's file (an update's new rows follow the base table's)
    duplicates: float = 0.003
    noise: float = 0.02
    version: int = VERSION


def file_name(number: int) -> str:
    return f"p{number // 100_000:02d}/{number // PER_FOLDER % 100:03d}/i{number:07d}.png"


def source_pngs(cache: Path, count: int = 8) -> list[Path]:
    """A few real small PNGs: CIFAR-10 test images re-encoded (drawn noise when the archive is absent)."""
    folder = cache / "sources"
    paths = [folder / f"{i}.png" for i in range(count)]
    if all(path.is_file() for path in paths):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    archive = DATA / "cifar10-test.tar.gz"
    images: list[Image.Image] = []
    if archive.is_file():
        with tarfile.open(archive) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith((".jpg", ".png")):
                    with tar.extractfile(member) as handle:  # type: ignore[union-attr]
                        images.append(Image.open(handle).convert("RGB"))
                if len(images) == count:
                    break
    rng = np.random.default_rng(0)
    while len(images) < count:
        images.append(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
    for image, path in zip(images, paths, strict=True):
        image.save(path)
    return paths


def ensure_files(cache: Path, count: int) -> Path:
    """The files folder holding at least ``count`` hard-linked images (only the missing ones are made)."""
    root = cache / "files"
    done_path = cache / "files.count"
    done = int(done_path.read_text()) if done_path.is_file() else 0
    if done >= count:
        return root
    sources = source_pngs(cache)
    start = time.perf_counter()
    print(f"linking files {done:,} .. {count:,} under {root}", flush=True)
    for number in range(done, count):
        target = root / file_name(number)
        if number % PER_FOLDER == 0 or number == done:
            target.parent.mkdir(parents=True, exist_ok=True)
        base = sources[number % len(sources)]
        source = base.with_name(f"{base.stem}-{number // LINKS_PER_SOURCE}.png")  # ext4 allows 65,000 links a file
        if not source.is_file():
            shutil.copyfile(base, source)
        with contextlib.suppress(FileExistsError):  # a run killed midway made it already
            os.link(source, target)
        if (number + 1) % 100_000 == 0:
            print(f"  {number + 1:,} files ({time.perf_counter() - start:.0f} s)", flush=True)
            done_path.write_text(str(number + 1))
    done_path.write_text(str(count))
    return root


class Vectors:
    """The fixed latent geometry (cluster centres, sub-centres, spectrum, projection) of one seed."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.spectrum = (1.0 / np.sqrt(np.arange(1, LATENT + 1))).astype(np.float32)
        self.centres = rng.standard_normal((CLUSTERS, LATENT)).astype(np.float32) * 1.5
        self.subcentres = self.centres[:, None] + rng.standard_normal((CLUSTERS, SUBCENTRES, LATENT)).astype(
            np.float32) * 0.6
        self.projection = rng.standard_normal((LATENT, DIM)).astype(np.float32) / np.sqrt(LATENT)
        weights = 0.75 ** np.arange(CLUSTERS - 1)
        self.weights = np.concatenate([[1 / 3], weights / weights.sum() * 2 / 3])

    def chunk(self, rng: np.random.Generator, n: int, spec: Spec) -> tuple[np.ndarray, np.ndarray]:
        """``n`` embeddings (float32) and their cluster probabilities."""
        cluster = rng.choice(CLUSTERS, n, p=self.weights)
        latent = self.subcentres[cluster, rng.integers(0, SUBCENTRES, n)]
        latent += rng.standard_normal((n, LATENT), dtype=np.float32) * 0.5
        distances = ((latent[:, None, :] - self.centres[None]) ** 2 * self.spectrum).sum(axis=2)
        logits = -(distances - distances.min(axis=1, keepdims=True)) / 12.0  # median confidence ~0.9
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        vectors = (latent * self.spectrum) @ self.projection
        vectors += rng.standard_normal((n, DIM), dtype=np.float32) * spec.noise
        copies = rng.choice(n, max(1, round(n * spec.duplicates)), replace=False)
        originals = rng.integers(0, n, len(copies))
        vectors[copies] = vectors[originals] + rng.standard_normal((len(copies), DIM), dtype=np.float32) * 1e-3
        probs[copies] = probs[originals]
        return vectors, probs.astype(np.float32)


def write_synthetic_table(out: Path, root: Path, spec: Spec) -> Path:
    """Write the table ``out`` (+ embeddings, skipped list, meta last) unless the same spec is cached there."""
    embeddings_path, meta_path = labels_paths(out)
    spec_path = out.with_name(out.name + ".spec.json")
    if meta_path.is_file() and spec_path.is_file() and json.loads(spec_path.read_text()) == asdict(spec):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"writing {out} ({spec.rows:,} rows, {spec.rows * DIM * 2 / 2**30:.2f} GB of float16 embeddings)",
          flush=True)
    meta_path.unlink(missing_ok=True)  # the meta is the commit: no meta, no table
    card = json.loads(MODEL.with_suffix(".json").read_text())
    names = card["class_names"]
    vectors = Vectors(spec.seed)
    array = np.lib.format.open_memmap(embeddings_path, mode="w+", dtype=np.float16, shape=(spec.rows, DIM))
    sizes = np.zeros(CLUSTERS, np.int64)
    start = time.perf_counter()

    def chunks():
        for first in range(0, spec.rows, CHUNK):
            n = min(CHUNK, spec.rows - first)
            chunk_vectors, probs = vectors.chunk(np.random.default_rng([spec.seed, spec.first + first]), n, spec)
            array[first:first + n] = chunk_vectors
            paths = [file_name(spec.first + first + j) for j in range(n)]
            rows = label_rows(paths, probs, names)
            sizes[:] += np.bincount([row["cluster"] for row in rows], minlength=CLUSTERS)
            if first and first % 200_000 == 0:
                print(f"  {out.name}: {first:,} of {spec.rows:,} rows ({time.perf_counter() - start:.0f} s)",
                      flush=True)
            yield rows

    write_table(out, chunks())
    array.flush()
    skipped_path(out).write_text("")
    meta = labels_meta(out, root, MODEL, file_sha256(MODEL), card.get("checkpoint_sha256"), "float16", DIM,
                       spec.rows, min(5, CLUSTERS), names, 1, [])
    meta.update(labelled=spec.rows, errors=0, cluster_sizes=sizes.tolist())
    spec_path.write_text(json.dumps(asdict(spec)))
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return out


def disk_mb(*paths: Path) -> float:
    """Bytes on disk of files and folders, in MB."""
    total = 0
    for path in paths:
        files = path.rglob("*") if path.is_dir() else [path]
        total += sum(file.stat().st_size for file in files if file.is_file())
    return round(total / 2**20, 1)

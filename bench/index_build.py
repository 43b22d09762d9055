"""CPU seconds and peak RSS of ``twist index`` at scale: a build of N synthetic images, then two 1 % updates, one
from a table holding only the new rows and one from the full table with another 1 % added.

Tables are in the ``twist label`` format (float16 embeddings from ``bench.index_layout.synthetic``); only the
new rows' files exist (hard links to one real PNG), which is all a table-source update looks at.

    nice -n 5 python -m bench.index_build --n 100000 --work /tmp/i39idx/b100k
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.index_layout import synthetic
from twist_core.label.table import labels_paths, write_table

RESULTS = Path(__file__).parent / "results" / "index_build.json"
PNG = Path("/tmp/data/caltech20/Faces_easy").glob("*")


def make_table(table: Path, root: Path, first: int, count: int, seed: int, files: bool) -> None:
    """Rows ``first .. first+count`` (paths img/<i>.png under ``root``), embeddings and meta beside."""
    embeddings_path, meta_path = labels_paths(table)
    vectors = np.lib.format.open_memmap(embeddings_path, mode="w+", dtype=np.float16, shape=(count, 1024))
    _, clusters = synthetic(count, seed, out=vectors)
    vectors.flush()
    margins = np.random.default_rng(seed).uniform(0, 1, count).round(4)
    source = next(p for p in PNG if p.suffix.lower() in (".jpg", ".png"))
    if files:
        (root / "img").mkdir(parents=True, exist_ok=True)
        for i in range(first, first + count):
            target = root / "img" / f"{i}.jpg"
            if not target.exists():
                os.link(source, target)

    def rows():
        for start in range(0, count, 50_000):
            yield [{"path": f"img/{first + i}.jpg", "cluster": int(clusters[i]), "cluster_name": f"c{clusters[i]}",
                    "confidence": float(0.5 + margins[i] / 2), "margin": float(margins[i]), "topk": "[]",
                    "error": "", "review_score": None} for i in range(start, min(count, start + 50_000))]

    write_table(table, rows())
    meta_path.write_text(json.dumps({"root": str(root), "embedding_dim": 1024}))


def concat(tables: list[Path], out: Path, root: Path) -> None:
    """One table holding the rows of ``tables`` in order (the full table after an update)."""
    parts = [np.load(labels_paths(t)[0], mmap_mode="r") for t in tables]
    target = np.lib.format.open_memmap(labels_paths(out)[0], mode="w+", dtype=np.float16,
                                       shape=(sum(len(p) for p in parts), 1024))
    start = 0
    for part in parts:
        target[start:start + len(part)] = part
        start += len(part)
    target.flush()
    with open(out, "w") as handle:
        for i, table in enumerate(tables):
            lines = table.read_text().splitlines(keepends=True)
            handle.writelines(lines if i == 0 else lines[1:])
    labels_paths(out)[1].write_text(json.dumps({"root": str(root), "embedding_dim": 1024}))


def measured(*args: str) -> dict:
    """CPU seconds, peak RSS and wall time of one ``twist index`` process (its own rusage, from wait4)."""
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen([sys.executable, "-m", "twist_core.cli", "index", *args], stderr=log,
                                   stdout=log)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        text = log.read()
    if process.returncode:
        raise SystemExit(text)
    return {"cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024),
            "wall_s": round(time.monotonic() - start, 1), "output": text.strip().splitlines()[-4:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--make-only", action="store_true", help="write the tables and stop")
    args = parser.parse_args()
    work, root, step = args.work, args.work / "images", max(1, args.n // 100)
    work.mkdir(parents=True, exist_ok=True)
    base, new1, new2, full = (work / f"{name}.csv" for name in ("base", "new1", "new2", "full"))
    if args.make_only:
        make_table(base, root, 0, args.n, 1, files=False)
        make_table(new1, root, args.n, step, 2, files=True)
        make_table(new2, root, args.n + step, step, 3, files=True)
        concat([base, new1, new2], full, root)
        return
    if not full.exists():  # in a process of its own: a child inherits its parent's peak RSS as its floor
        subprocess.run([sys.executable, "-m", "bench.index_build", "--n", str(args.n), "--work", str(work),
                        "--make-only"], check=True)
    out = work / "index"
    result = {"n": args.n, "build": measured(str(base), "--out", str(out)),
              "update_new_rows_table": measured(str(new1), "--update", "--out", str(out)),
              "update_full_table": measured(str(full), "--update", "--out", str(out))}
    print(json.dumps(result, indent=1))
    every = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    every[str(args.n)] = result
    RESULTS.write_text(json.dumps(every, indent=1) + "\n")


if __name__ == "__main__":
    main()

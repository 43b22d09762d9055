"""Which index layout a large ``twist index`` should use: CPU to build, bytes per image, recall@10 against exact
search in the original space, and the cost of the review score's all-against-all neighbour join.

Synthetic embeddings with a realistic (decaying) spectrum: 10 clusters of 100 sub-centres in a 64-d latent
space, mapped into 1,024 d by a fixed random matrix, plus small isotropic noise, stored float16 as ``twist
label`` writes them. A real embedding (a ``twist label`` table's ``.embeddings.npy``) can be measured beside it.

    python -m bench.index_layout --n 100000 --real /tmp/i39idx/cal/labels.embeddings.npy
"""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

import faiss
import numpy as np

from twist_core.index.recall import exact_top
from twist_core.knn_join import self_neighbours
from twist_core.vectors import TRAIN_POINTS_PER_LIST, build, normalized, plan_index

DIM = 1024
LATENT = 64
QUERIES = 200
K = 10
CODES = {"ivf": "float32", "ivfpq": "pq8", "pcasq": "fp16"}  # what a stored vector is made of
CHOICE = ("pcasq past 500k images: a 128-d projection stored in the index + IVF with 16-bit codes keeps recall@10 "
          "0.9995 (synthetic 100k) and 0.955 (caltech20's real embedding) at ~290 B per image, its review join 5x "
          "cheaper than IVF-flat's; 8-bit codes (sq8 rows) lost 5 % of recall on the synthetic set, IVF-PQ 43 %")
RESULTS = Path(__file__).parent / "results" / "index_layout.json"


def synthetic(n: int, seed: int = 0, dim: int = DIM, clusters: int = 10, sub: int = 100,
              out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Unit float16 embeddings of ``n`` images (into ``out`` when given, e.g. a memory map) and their clusters:
    cluster + sub-centre offsets in a latent space, mapped up, plus noise."""
    fixed = np.random.default_rng(12345)
    mapping = fixed.standard_normal((LATENT, dim), dtype=np.float32) / np.sqrt(LATENT)
    centres = fixed.standard_normal((clusters, LATENT), dtype=np.float32)
    subs = centres[:, None] + 0.6 * fixed.standard_normal((clusters, sub, LATENT), dtype=np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float16) if out is None else out
    labels = np.empty(n, np.int64)
    for start in range(0, n, 50_000):
        m = min(n, start + 50_000) - start
        chosen = rng.integers(0, clusters * sub, m)
        labels[start:start + m] = chosen // sub
        picked = subs.reshape(-1, LATENT)[chosen]
        latent = picked + 0.35 * rng.standard_normal((m, LATENT), dtype=np.float32)
        out[start:start + m] = normalized(latent @ mapping + 0.02 * rng.standard_normal((m, dim), dtype=np.float32))
    return out, labels


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(embeddings: np.ndarray, kind: str, nlist: int | str = "auto") -> dict:
    n, dim = embeddings.shape
    plan = plan_index(n, dim, kind, nlist)
    rng = np.random.default_rng(0)
    sample = normalized(embeddings[np.sort(rng.choice(n, min(n, max(plan.nlist * TRAIN_POINTS_PER_LIST, 39 * 256)),
                                                      replace=False))])
    start = cpu()

    def chunks():
        for first in range(0, n, 100_000):
            yield np.arange(first, min(n, first + 100_000)), normalized(embeddings[first:first + 100_000])

    index = build(plan, dim, n, chunks, sample)
    built = cpu() - start
    queries_at = np.random.default_rng(1).choice(n, QUERIES, replace=False)
    queries = normalized(embeddings[queries_at])
    truth = exact_top(embeddings, np.arange(n), np.arange(n), queries)
    start = cpu()
    _, found = index.search(queries, K)
    per_query_ms = (cpu() - start) / QUERIES * 1000
    recall = float(np.mean([len(set(found[i]) & set(truth[i])) / K for i in range(QUERIES)]))
    start = cpu()
    blocks = 0
    for batch, _, _ in self_neighbours(index, np.arange(n), 5):
        blocks += len(batch)
    join = cpu() - start
    return {"kind": plan.kind, "n": n, "nlist": plan.nlist, "nprobe": plan.nprobe, "dims": plan.pca_dim or dim,
            "bytes_per_image": round(len(faiss.serialize_index(index)) / n, 1), "build_cpu_s": round(built, 2),
            "query_cpu_ms": round(per_query_ms, 3), "recall_at_10": round(recall, 4),
            "review_join_cpu_s": round(join, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--kinds", default="ivf,ivfpq,pcasq")
    parser.add_argument("--real", help="a twist label .embeddings.npy to measure too")
    args = parser.parse_args()
    data = {"synthetic": synthetic(args.n)[0]}
    if args.real:
        data["real"] = np.load(args.real, mmap_mode="r")
    rows = json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else []
    for name, embeddings in data.items():
        for kind in args.kinds.split(","):
            nlist = "auto" if len(embeddings) > 20_000 else max(8, len(embeddings) // 100)
            row = {"data": name, **measure(embeddings, kind, nlist)}
            print(json.dumps(row), flush=True)
            rows = [r for r in rows if (r["data"], r["kind"], r.get("codes")) != (name, kind, CODES[kind])]
            rows.append({**row, "codes": CODES[kind]})
    RESULTS.write_text(json.dumps({"rows": rows, "choice": CHOICE}, indent=1) + "\n")


if __name__ == "__main__":
    main()

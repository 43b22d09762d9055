"""Benchmark the image index against brute-force NumPy on random and clustered 512-d unit vectors.

For each size: build time, RSS growth and serialized size of the index chosen by ``plan_index`` (plus the
exact flat index), single-query latency p50/p99, batch-64 queries/s and recall@10 against exact search,
and an IVF ``nprobe`` sweep showing the speed/recall trade-off. Brute force (matrix product + argpartition)
runs in the same process as the baseline. Random unit vectors are the worst case for IVF (no structure to
exploit); ``clustered`` mimics trained embeddings (points around class centres). From 100k on, RaBitQ codes
with exact reranking (and HNSW at 100k) show what unstructured data costs with methods ``twist index`` does not use.

    python -m bench.bench_index                       # 10k, 100k, 1M; writes bench/results/index.json
    python -m bench.bench_index --sizes 10000 --queries 200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from twist_core.vectors import (
    TRAIN_POINTS_PER_LIST,
    IndexPlan,
    build,
    default_nlist,
    default_nprobe,
    normalized,
    plan_index,
)

DIM = 512
K = 10
SWEEP = (8, 16, 32, 64, 128)


def rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_vectors(kind: str, n: int, seed: int) -> np.ndarray:
    """Random unit vectors, or unit vectors around 1,000 centres (like trained embeddings)."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return normalized(rng.standard_normal((n, DIM), dtype=np.float32))
    centres = np.random.default_rng(12345).standard_normal((1000, DIM), dtype=np.float32)
    out = centres[rng.integers(0, len(centres), n)]
    out += rng.standard_normal((n, DIM), dtype=np.float32)  # nearest neighbours at cosine ~0.55
    return normalized(out)


def numpy_topk(base: np.ndarray, queries: np.ndarray, k: int = K) -> np.ndarray:
    """Brute force: one matrix product, then argpartition (the baseline and the ground truth)."""
    sims = queries @ base.T
    part = np.argpartition(-sims, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1)


def exact_truth(base: np.ndarray, queries: np.ndarray) -> np.ndarray:
    return np.vstack([numpy_topk(base, queries[i:i + 64]) for i in range(0, len(queries), 64)])


def latency(search: Callable[[np.ndarray], object], queries: np.ndarray, n: int) -> tuple[float, float]:
    """p50 and p99 in ms of one query at a time, over ``n`` queries (after two warm-up calls)."""
    for q in queries[:2]:
        search(q[None])
    times = []
    for q in queries[:n]:
        start = time.perf_counter()
        search(q[None])
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def batch_qps(search: Callable[[np.ndarray], object], queries: np.ndarray, batches: int) -> float:
    search(queries[:64])
    start = time.perf_counter()
    done = 0
    for b in range(batches):
        chunk = queries[(b * 64) % len(queries):][:64]
        search(chunk)
        done += len(chunk)
    return done / (time.perf_counter() - start)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)]))


def index_bytes(index: faiss.Index) -> int:
    with tempfile.NamedTemporaryFile(suffix=".faiss") as handle:
        faiss.write_index(index, handle.name)
        return os.path.getsize(handle.name)


def build_timed(plan: IndexPlan, base: np.ndarray) -> tuple[faiss.Index, float, float]:
    rss = rss_mb()
    start = time.perf_counter()
    size = min(len(base), plan.nlist * TRAIN_POINTS_PER_LIST)
    sample = base[np.random.default_rng(0).choice(len(base), size, replace=False)]
    ids = np.arange(len(base), dtype=np.int64)
    index = build(plan, DIM, len(base), lambda: iter([(ids, base)]), sample, "cpu")
    return index, time.perf_counter() - start, rss_mb() - rss


def bench_one(dist: str, n: int, n_queries: int) -> list[dict]:
    base = make_vectors(dist, n, seed=1)
    queries = make_vectors(dist, n_queries, seed=2)
    truth = exact_truth(base, queries)
    slow = n >= 500_000  # brute force costs ~0.1 s per query here: time fewer of them
    single = 30 if slow else min(300, n_queries)
    rows = []

    def record(method: str, search: Callable, found: np.ndarray, build_s: float = 0.0, rss: float = 0.0,
               size: int = 0, n_single: int = n_queries, batches: int = 30, **extra) -> None:
        p50, p99 = latency(search, queries, n_single)
        qps = batch_qps(search, queries, batches)
        row = {"dist": dist, "n": n, "method": method, "build_s": round(build_s, 2), "rss_mb": round(rss),
               "index_mb": round(size / 2**20), "p50_ms": round(p50, 3), "p99_ms": round(p99, 3),
               "batch64_qps": round(qps), "recall10": round(recall(found, truth), 4), **extra}
        rows.append(row)
        print(format_row(row), flush=True)

    few = 3 if n >= 100_000 else 20
    record("numpy-bruteforce", lambda q: numpy_topk(base, q), truth, n_single=single, batches=few)
    flat, build_s, rss = build_timed(IndexPlan("flat"), base)
    flat_ids = flat.search(queries, K)[1]
    record("faiss-flat", lambda q: flat.search(q, K), flat_ids, build_s, rss, index_bytes(flat),
           n_single=single, batches=few)

    if n >= 100_000:
        unstructured_alternatives(base, queries, record)
    plan = plan_index(n, DIM, "ivf" if n > 20_000 else "auto")
    if plan.kind == "flat":
        return rows
    ivf, build_s, rss = build_timed(plan, base)
    size = index_bytes(ivf)
    for nprobe in sorted({*SWEEP, plan.nprobe}):
        if nprobe > plan.nlist:
            continue
        ivf.nprobe = nprobe
        label = "faiss-ivf (default)" if nprobe == plan.nprobe else "faiss-ivf"
        record(label, lambda q: ivf.search(q, K), ivf.search(queries, K)[1], build_s, rss, size,
               n_single=min(n_queries, 500), nlist=plan.nlist, nprobe=nprobe)
    return rows


def unstructured_alternatives(base: np.ndarray, queries: np.ndarray, record: Callable) -> None:
    """The best this CPU does without structure to exploit: scan 1-bit RaBitQ codes (SIMD fast scan), then
    rerank ``k_factor * 10`` candidates exactly; and HNSW up to 100k (its build grows too slow beyond).

    Not used by ``twist index``: these rows show what the random-vector target costs with any method.
    """
    start = time.perf_counter()
    codes = faiss.index_factory(DIM, "RaBitQfs", faiss.METRIC_INNER_PRODUCT)
    codes.train(base[:100_000])
    codes.add(base)
    build_s = time.perf_counter() - start
    for k_factor in (50, 200, 1000):
        def rerank(q: np.ndarray, k_factor: int = k_factor) -> np.ndarray:
            candidates = codes.search(q, K * k_factor)[1]
            out = np.empty((len(q), K), dtype=np.int64)
            for row, (vector, found) in enumerate(zip(q, candidates, strict=True)):
                found = found[found >= 0]
                out[row] = found[np.argsort(-(base[found] @ vector))[:K]]
            return out

        record("rabitq-fastscan+rerank", rerank, rerank(queries), build_s, size=index_bytes(codes),
               n_single=min(len(queries), 300), batches=5, k_factor=k_factor)
    if len(base) > 100_000:
        return
    start = time.perf_counter()
    graph = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = 80
    graph.add(base)
    build_s = time.perf_counter() - start
    for ef in (256, 1024, 2048):
        graph.hnsw.efSearch = ef
        record("hnsw32", lambda q: graph.search(q, K), graph.search(queries, K)[1], build_s,
               n_single=min(len(queries), 300), batches=5, ef_search=ef)


def format_row(row: dict) -> str:
    ivf = "".join(f" {key}={row[key]}" for key in ("nlist", "nprobe", "k_factor", "ef_search") if key in row)
    return (f"{row['dist']:<9} {row['n']:>8} {row['method'] + ivf:<45} {row['build_s']:>8.1f} "
            f"{row['rss_mb']:>7} {row['index_mb']:>7} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} "
            f"{row['batch64_qps']:>9} {row['recall10']:>7.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dists", nargs="+", default=["random", "clustered"],
                        choices=["random", "clustered"])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "index.json"))
    args = parser.parse_args()
    print(f"{'dist':<9} {'n':>8} {'method':<45} {'build_s':>8} {'rss_mb':>7} {'idx_mb':>7} {'p50_ms':>8} "
          f"{'p99_ms':>8} {'q/s@64':>9} {'rec@10':>7}")
    rows = []
    for n in args.sizes:
        for dist in args.dists:
            rows += bench_one(dist, n, args.queries)
    nlist = default_nlist(1_000_000)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "load_average": os.getloadavg(), "faiss": faiss.__version__, "numpy": np.__version__,
               "omp_threads": faiss.omp_get_max_threads(), "default_nlist_1M": nlist,
               "default_nprobe_1M": default_nprobe(nlist)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "dim": DIM, "k": K, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

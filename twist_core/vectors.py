"""Which FAISS index fits a collection, how to train and fill it, and how to put it on a GPU for search.

Vectors are L2-normalised and compared by inner product, i.e. cosine similarity. Ids are chosen by the
caller (the SQLite row ids) and survive removals: a flat index is wrapped in ``IndexIDMap2``, an IVF index
takes ids directly and keeps a hash-table direct map so any id can be reconstructed or removed.

The compressed kind ``pcasq`` (auto past ``COMPRESSED_MIN_VECTORS``) stores a projection onto the top
eigenvectors of the vectors' second-moment matrix (not the covariance: without centring, inner products in
the reduced space stay cosines of the originals) inside the index (``IndexPreTransform``, so queries and
``reconstruct`` go through it), then IVF with 16-bit float codes: 256 B per image instead of 4 KB
(``bench/index_layout.py``, ``bench/results/index_layout.json``: 8-bit codes lost 5 % of recall@10 on
clustered data, whose nearest neighbours are close together; the projection itself lost 0.05 %). Every reader
path works on it; a reconstructed vector is its projection back into the original space.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import faiss
import numpy as np

from twist_core.config import AUTO

FLAT_MAX_VECTORS = 50_000  # exact search stays under a few ms up to here on a laptop CPU
COMPRESSED_MIN_VECTORS = 500_000  # past this, full 1,024-d float vectors cost GBs of RAM: project and quantise
PCA_DIM = 128  # kept dimensions of the compressed kind (recall@10 >= 0.95, bench/results/index_layout.json)
TRAIN_POINTS_PER_LIST = 50  # k-means sample size per coarse centroid (FAISS asks for at least 39)
PQ_TRAIN_POINTS = 39 * 256  # each 8-bit PQ codebook has 256 centroids
KMEANS_ITERATIONS = 10  # the coarse quantizer barely improves after ~10 iterations; build time halves
KINDS = ("auto", "flat", "ivf", "ivfpq", "pcasq")


@dataclass(frozen=True)
class IndexPlan:
    kind: str
    nlist: int = 0
    nprobe: int = 0
    pq_m: int = 0
    pca_dim: int = 0


def default_nlist(n: int) -> int:
    """~2 sqrt(N) lists (2,000 for 1M), never so many that k-means lacks 39 training points per list.

    FAISS suggests 4-16 sqrt(N) for the fastest queries, but training and assigning 1M vectors to that
    many centroids takes several minutes on a small CPU; 2 sqrt(N) with a few % of lists probed already
    answers in milliseconds (bench/bench_index.py).
    """
    return max(1, min(int(2 * math.sqrt(n)), n // 39))


def default_nprobe(nlist: int) -> int:
    """Lists visited per query: at least 16, ~1% of the lists beyond 2,000.

    bench/bench_index.py, 1M clustered 512-d vectors, 2,000 lists: nprobe 16 gives recall@10 1.000 at
    5 ms p99 on 2 busy cores, while 62 doubles the latency for nothing. Raise it for less structured data.
    """
    return min(nlist, max(16, nlist // 128))


def pq_subquantizers(dim: int, wanted: int) -> int:
    """The largest divisor of ``dim`` not above ``wanted`` (PQ needs ``dim % m == 0``)."""
    return max(m for m in range(1, min(wanted, dim) + 1) if dim % m == 0)


def plan_index(n: int, dim: int, kind: str = AUTO, nlist: int | str = AUTO, nprobe: int | str = AUTO,
               pq_m: int | str = AUTO, flat_max: int = FLAT_MAX_VECTORS,
               compressed_min: int = COMPRESSED_MIN_VECTORS) -> IndexPlan:
    """Flat (exact) up to ``flat_max``, IVF above, the compressed ``pcasq`` from ``compressed_min``."""
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == AUTO:
        kind = "flat" if n <= flat_max else "pcasq" if n >= compressed_min and dim > PCA_DIM else "ivf"
    if kind == "flat":
        return IndexPlan("flat")
    nlist = default_nlist(n) if nlist == AUTO else int(nlist)
    if n < nlist:
        raise ValueError(f"an IVF index with {nlist} lists needs at least {nlist} vectors to train, got {n}")
    return IndexPlan(kind, nlist, min(default_nprobe(nlist) if nprobe == AUTO else int(nprobe), nlist),
                     pq_subquantizers(dim, max(1, dim // 8) if pq_m == AUTO else int(pq_m)) if kind == "ivfpq" else 0,
                     min(PCA_DIM, dim) if kind == "pcasq" else 0)


def training_size(plan: IndexPlan, n: int) -> int:
    """How many of ``n`` vectors train the plan's quantizers: enough points per coarse list, and per PQ codebook."""
    return min(n, max(plan.nlist * TRAIN_POINTS_PER_LIST, PQ_TRAIN_POINTS * (plan.pq_m > 0)))


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when FAISS sees a GPU, else ``cpu``; ``cuda`` without one is an error."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; choose auto, cpu or cuda")
    if device == "cuda" and not gpu_available():
        raise ValueError("device cuda was asked for but FAISS sees no GPU (use --device cpu or auto)")
    return "cuda" if device == "auto" and gpu_available() else "cpu" if device == "auto" else device


_GPU_RESOURCES: list = []


def to_device(index: faiss.Index, device: str) -> faiss.Index:
    """A GPU copy for searching when ``device`` is cuda; the CPU form is always what gets saved."""
    if device != "cuda":
        return index
    if not _GPU_RESOURCES:
        _GPU_RESOURCES.append(faiss.StandardGpuResources())
    try:
        return faiss.index_cpu_to_gpu(_GPU_RESOURCES[0], 0, index)
    except RuntimeError as error:  # e.g. an index type without a GPU implementation: search on the CPU
        warnings.warn(f"FAISS could not move the index to the GPU ({error}); searching on the CPU",
                      stacklevel=2)
        return index


def normalized(vectors: np.ndarray) -> np.ndarray:
    """A float32, C-contiguous, unit-length copy (zero rows stay zero)."""
    out = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if out.ndim == 1:
        out = out[None]
    faiss.normalize_L2(out)
    return out


def drop_self(queries: np.ndarray, found: np.ndarray, sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best results that are not the query itself (the last one goes when the query is absent)."""
    is_self = found == queries[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    keep = ~is_self
    return found[keep].reshape(len(queries), k), sims[keep].reshape(len(queries), k)


def projection(sample: np.ndarray, out_dim: int) -> faiss.LinearTransform:
    """The top ``out_dim`` eigenvectors of the sample's second moment as an orthonormal map (no centring, so
    inner products of unit vectors stay their cosines up to the energy left out)."""
    moment = sample.T.astype(np.float64) @ sample.astype(np.float64) / max(1, len(sample))
    _, vectors = np.linalg.eigh(moment)
    matrix = np.ascontiguousarray(vectors[:, ::-1][:, :out_dim].T, dtype=np.float32)
    transform = faiss.LinearTransform(sample.shape[1], out_dim, False)
    faiss.copy_array_to_vector(matrix.ravel(), transform.A)
    transform.is_trained = True
    transform.set_is_orthonormal()
    return transform


def empty_index(plan: IndexPlan, dim: int) -> faiss.Index:
    if plan.kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    inner_dim = plan.pca_dim or dim
    quantizer = faiss.IndexFlatIP(inner_dim)
    if plan.kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, plan.nlist, faiss.METRIC_INNER_PRODUCT)
    elif plan.kind == "pcasq":
        index = faiss.IndexIVFScalarQuantizer(quantizer, inner_dim, plan.nlist, faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFPQ(quantizer, dim, plan.nlist, plan.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
    index.own_fields = True
    quantizer.this.disown()
    index.cp.niter = KMEANS_ITERATIONS
    index.nprobe = plan.nprobe
    return index


def build(plan: IndexPlan, dim: int, n: int, chunks: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]],
          sample: np.ndarray, device: str = "cpu") -> faiss.Index:
    """Train on ``sample`` (IVF only; on the GPU when there is one), then add ``(ids, vectors)`` chunks.

    All vectors must already be normalised. Adding happens on the CPU so ids and the direct map are exact.
    """
    index = empty_index(plan, dim)
    if plan.kind != "flat":
        transform = projection(sample, plan.pca_dim) if plan.pca_dim else None
        if transform is not None:
            sample = transform.apply(sample)
        trained = to_device(index, device)
        trained.train(sample)
        index = faiss.index_gpu_to_cpu(trained) if trained is not index else index
        index.nprobe = plan.nprobe
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        if transform is not None:
            index = with_transform(transform, index)
    for ids, vectors in chunks():
        index.add_with_ids(vectors, ids)
    return index


def with_transform(transform: faiss.VectorTransform, index: faiss.Index) -> faiss.IndexPreTransform:
    """``index`` behind ``transform``, owning both (SWIG would otherwise free them with their Python names)."""
    wrapped = faiss.IndexPreTransform(transform, index)
    wrapped.own_fields = True
    index.this.disown()
    transform.this.disown()
    return wrapped


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Works for a CPU IVF index and for its GPU copy; a flat index has nothing to set."""
    if hasattr(index, "nprobe"):
        index.nprobe = nprobe
    else:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.nprobe = nprobe


def search_params(index: faiss.Index, selector: faiss.IDSelector | None,
                  nprobe: int) -> faiss.SearchParameters:
    """Parameters for ``index.search``; behind a projection they go to the inner index (the caller keeps
    ``selector`` alive while searching)."""
    if faiss.try_extract_index_ivf(index) is not None:
        params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
    else:
        params = faiss.SearchParameters(sel=selector)
    if isinstance(index, faiss.IndexPreTransform):
        outer = faiss.SearchParametersPreTransform()
        outer.index_params = params
        outer.referenced = params  # keeps the inner parameters alive as long as the outer ones
        return outer
    return params

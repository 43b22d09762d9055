"""``twist search INDEX IMAGE -k 10``: the most similar indexed images to an image file (or an indexed id)."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from twist_core.config import AutoConfig, option
from twist_core.data.folder import decode_image
from twist_core.deploy.infer import finite_rows
from twist_core.index.image_index import Hit, IndexReader, NameSource
from twist_core.index.metadata import IndexUserError
from twist_core.io_utils import path_to_text


@dataclass
class SearchConfig(AutoConfig):
    index: str = option(None, "index folder written by twist index")
    image: str | None = option(None, "query image file (or use --id for an image already in the index)")
    id: int | None = option(None, "search by the id of an indexed image instead of an image file")
    k: int = option(10, "number of neighbours", metavar="K")
    cluster: int | None = option(None, "only return images of this cluster")
    model: str | None = option(None, "ONNX model that embeds the query image; default: the one in the index")
    device: str = option("auto", "where FAISS and the model run", choices=["auto", "cpu", "cuda"])
    json: str | None = option(None, "also write the results to this JSON file")
    state_dir: str | None = option(None, "the app's state folder, whose cluster names are shown; default: INDEX")


def hit_dict(hit: Hit) -> dict[str, Any]:
    """A hit for JSON; ``abs_path`` as table text like ``path`` (a name that is not UTF-8 has ``\\xNN``)."""
    return {**dataclasses.asdict(hit), "abs_path": path_to_text(str(hit.abs_path))}


def printable(text: str) -> str:
    """``text`` as this stdout can show it: a character its encoding lacks (LANG=C, a Windows console) becomes
    a ``\\xNN`` escape instead of a crash at print time."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    return text.encode(encoding, "backslashreplace").decode(encoding)


def format_hits(hits: list[Hit]) -> str:
    """A fixed-width table: rank, similarity, cluster, confidence, id, path, printable on this stdout."""
    lines = [f"{'#':>3}  {'sim':>6}  {'cluster':<16} {'conf':>5}  {'id':>8}  path"]
    for rank, hit in enumerate(hits, 1):
        cluster = "-" if hit.cluster is None else f"{hit.cluster} {hit.cluster_name or ''}".strip()
        conf = "-" if hit.confidence is None else f"{hit.confidence:.2f}"
        sim = "-" if hit.similarity is None else f"{hit.similarity:.4f}"
        lines.append(f"{rank:>3}  {sim:>6}  {cluster[:16]:<16} {conf:>5}  {hit.id:>8}  {hit.path}")
    return printable("\n".join(lines))


def search(config: SearchConfig, names: NameSource | None = None) -> list[Hit]:
    """The query's nearest images; ``names`` gives hits the names a person gave clusters (see IndexReader)."""
    if config.k < 1:  # FAISS would answer nothing, and "no images found" would blame the index
        raise IndexUserError(f"k (-k, --k) is how many neighbours to return: at least 1, got {config.k}")
    index = IndexReader.open(config.index, config.device, names)
    try:
        if config.id is not None:
            return index.search_id(config.id, config.k, config.cluster)
        if not config.image:
            raise IndexUserError("give a query IMAGE or --id")
        if not Path(config.image).is_file():
            raise IndexUserError(f"query image {config.image} not found")
        model_path = config.model or index.info.get("model")
        if not model_path:
            raise IndexUserError("the index records no model; give --model to embed the query image")
        from twist_core.deploy.infer import DeviceUnavailable, OnnxModel

        try:
            model = OnnxModel(model_path, device=config.device)
        except DeviceUnavailable as error:
            raise IndexUserError(str(error)) from None
        return index.search_vectors(query_vector(model, config.image, index.dim), config.k, config.cluster)[0]
    finally:
        index.close()


def query_vector(model: Any, image: str, dim: int) -> np.ndarray:
    """The query image's embedding, refused when it cannot be compared (NaN/inf would match nothing)."""
    if model.embedding_dim != dim:
        raise IndexUserError(f"the model gives {model.embedding_dim}-d embeddings but the index holds {dim}-d "
                             "vectors; use the model the index was built with")
    _, embeddings = model.predict([decode_image(image)])
    if not finite_rows(embeddings).all():
        raise IndexUserError(f"the model {model.path} gives NaN or infinite values for {image}: the model file is "
                             "damaged (or was exported from a diverged run); export it again")
    return embeddings


def no_hits_reason(config: SearchConfig) -> str:
    where = "" if config.cluster is None else f" in cluster {config.cluster}"
    return f"no images found{where}: the index holds no comparable vectors there"

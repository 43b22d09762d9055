"""A plain JSON API beside the UI, under ``/api/v1/``, for scripts, notebooks and labelling tools.

The routes sit on the same FastAPI application as the Gradio UI, so they share its port, its login and its
front door (:mod:`app.guard`). A script logs in either with the UI's cookie (``POST /login``) or with HTTP Basic
credentials from the same ``--auth`` list. Images are addressed by index id and handed out re-encoded by the
app, never as a file path: nothing outside the index is reachable through these routes.
"""

from __future__ import annotations

import functools
import io
import json
import math
import shutil
import sqlite3
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, Field, ValidationError
from starlette.background import BackgroundTask

from app.guard import logged_in, vector_body_bytes
from app.results import AppUserError, Neighbour
from app.workspace import PAGE_SIZE, Workspace
from twist_core.curate.curation import Cursor, Record, cursor_of
from twist_core.index.image_index import Hit
from twist_core.index.metadata import IndexUserError

PREFIX = "/api/v1"
MAX_K = 200
UPLOAD_CHUNK = 1 << 20
MAX_ID = 2**63 - 1  # SQLite's largest integer
LABELS_PAGE, MAX_LABELS_PAGE = 1000, 10_000  # images per JSON page of /labels
CLUSTER_IMAGES = ("a page of a cluster's images, most confident first; the answer's `after` fetches the next page "
                  "(null at the end); a page number past the end is empty")
AFTER = "the `after` of the previous page's answer: the page just after it, at any depth"


class VectorQuery(BaseModel):
    vector: list[float] = Field(description="an embedding of the index's dimension (the model's `embedding` output)")
    k: int = Field(10, ge=1, le=MAX_K)


def require_login(request: Request) -> None:
    """The UI's rule for every route (checked before the body is read by :mod:`app.guard`; kept here so the
    routes stay closed wherever they are mounted): a login cookie or HTTP Basic credentials when the app has
    ``--auth``."""
    if not logged_in(request):
        raise HTTPException(401, "log in first: the app's --auth applies to the API", {"WWW-Authenticate": "Basic"})


class Workers:
    """The API's share of ``--concurrency``: each route's work (decoding, the model, the stores) runs in worker
    threads, at most ``concurrency`` requests of one route at a time, as the UI's queue does for its events;
    the event loop only moves bytes, so one slow request never holds up another."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self._limiters: dict[str, anyio.CapacityLimiter] = {}

    async def run(self, kind: str, work: Callable[[], Any]) -> Any:
        limiter = self._limiters.setdefault(kind, anyio.CapacityLimiter(self.concurrency))
        try:
            return await anyio.to_thread.run_sync(work, limiter=limiter)
        except sqlite3.DatabaseError as error:  # the index's file damaged under the app: say so, never a 500
            raise HTTPException(503, f"the index cannot be read now ({error}); the app's log and page say which "
                                     "file, and it serves again once the file is restored") from None

    def route(self, work: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        """``work`` as an endpoint (same parameters) that runs in the workers of its own kind."""
        @functools.wraps(work)
        async def endpoint(*args: Any, **kwargs: Any) -> Any:
            return await self.run(work.__name__, functools.partial(work, *args, **kwargs))

        return endpoint


def known_id(image_id: int) -> int:
    """An id SQLite can hold; any other names no image (404, where it used to overflow into a 500)."""
    if not 0 <= image_id <= MAX_ID:
        raise HTTPException(404, f"no image with id {image_id} in the index")
    return image_id


def format_cursor(cursor: Cursor) -> str:
    """A page cursor as the API hands it out: ``confidence:id`` (``null:id`` for an unknown confidence)."""
    confidence, image_id = cursor
    return f"{'null' if confidence is None else repr(float(confidence))}:{image_id}"


def parse_cursor(text: str | None) -> Cursor | None:
    """The cursor of :func:`format_cursor` back; 400 for anything else."""
    if text is None:
        return None
    confidence, _, image_id = text.rpartition(":")
    try:
        value = None if confidence == "null" else float(confidence)
        if value is not None and not math.isfinite(value):
            raise ValueError(confidence)
        return value, known_id(int(image_id))
    except (ValueError, HTTPException):
        raise HTTPException(400, f"{text!r} is not a page cursor: give the `after` of the previous answer") from None


def unit_query(values: list[float], dim: int) -> np.ndarray:
    """The query vector as the index searches it; 400 when it has no direction to search along."""
    vector = np.asarray(values, dtype=np.float32)[None]
    if vector.shape[1] != dim or not np.isfinite(vector).all():
        raise HTTPException(400, f"the vector must hold {dim} finite numbers")
    norm = float(np.linalg.norm(vector))
    if norm == 0.0 or not np.isfinite(norm):
        problem = "is zero (or too small to measure)" if norm == 0.0 else "is too large for 32-bit floats"
        raise HTTPException(400, f"the vector has no direction to search along: its length {problem}")
    return vector


async def capped_body(request: Request, limit: int) -> bytes:
    """The request's body, 413 once it passes ``limit`` (the front door refuses it sooner; this keeps the route
    bounded wherever it is mounted)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"a vector search body is at most {limit} bytes")
    return bytes(body)


def parse_vector_query(body: bytes) -> VectorQuery:
    """The JSON body as a ``VectorQuery`` (run in a worker: a long list of numbers takes a while to parse)."""
    try:
        return VectorQuery.model_validate_json(body)
    except ValidationError as error:
        raise HTTPException(422, jsonable_errors(error)) from None


def jsonable_errors(error: ValidationError) -> list[dict[str, Any]]:
    """Pydantic's errors as FastAPI shows them (without the input echoed back)."""
    return [{"type": e["type"], "loc": ["body", *e["loc"]], "msg": e["msg"]} for e in error.errors()]


def _temporary_csv(ws: Workspace) -> tuple[Path, BackgroundTask]:
    """The labels CSV in a folder of its own, and the task that removes that folder once the answer is sent."""
    path = ws.export_csv()
    return path, BackgroundTask(shutil.rmtree, path.parent, ignore_errors=True)


def _record_json(record: Record, names: dict[int, str]) -> dict[str, Any]:
    """One image as the API shows it: its current cluster and name, and the model's top clusters."""
    top = json.loads(record.topk) if record.topk else []
    return {"id": record.id, "path": record.path, "cluster": record.label,
            "name": names.get(record.label, "") if record.label is not None else "", "status": record.status,
            "predicted": record.predicted, "confidence": record.confidence,
            "topk": [{"cluster": int(c), "name": names.get(int(c), ""), "probability": p} for c, p in top]}


def _neighbours_json(hits: list[tuple[Record, float]], names: dict[int, str]) -> list[dict[str, Any]]:
    return [{**_record_json(record, names), "similarity": round(float(similarity), 6)} for record, similarity in hits]


def _pairs(neighbours: list[Neighbour]) -> list[tuple[Record, float]]:
    return [(n.record, n.similarity) for n in neighbours]


def _hits_to_pairs(ws: Workspace, hits: list[Hit]) -> list[tuple[Record, float]]:
    """Index hits with their curated records, without touching thumbnails (the API never shows them)."""
    records = ws.store.records([h.id for h in hits])
    return [(records[h.id], h.similarity or 0.0) for h in hits if h.id in records]


def _search_id(ws: Workspace, image_id: int, k: int) -> list[tuple[Record, float]]:
    try:
        return _hits_to_pairs(ws, ws.index.search_id(image_id, k))
    except IndexUserError as error:
        raise HTTPException(404, str(error)) from None


def _top_classes(probs: np.ndarray, names: dict[int, str], k: int = 5) -> list[dict[str, Any]]:
    order = np.argsort(-probs)[:k]
    return [{"cluster": int(c), "name": names.get(int(c), ""), "probability": round(float(probs[c]), 6)}
            for c in order]


def _cluster_images(ws: Workspace, cluster: int, page: int, lowest_first: bool, cursor: Cursor | None
                    ) -> dict[str, Any]:
    """A page of a cluster as the API answers it: by cursor when given (any depth costs the same), else by number."""
    items, total = ws.cluster_page(cluster, 0 if cursor else page, lowest_first, after=cursor, thumbnails=False)
    names = ws.names()
    shown = [] if cursor is None and page * PAGE_SIZE >= total else [record for record, _ in items]
    more = len(shown) == PAGE_SIZE
    return {"cluster": cluster, "page": None if cursor else page, "page_size": PAGE_SIZE, "total": total,
            "after": format_cursor(cursor_of(shown[-1])) if more else None,
            "images": [_record_json(record, names) for record in shown]}


def _labels_page(ws: Workspace, after: int, limit: int) -> dict[str, Any]:
    """The labels of the first ``limit`` images whose id is above ``after``, and the next page's ``after``."""
    names = ws.names()
    records = ws.store.records_after(after, limit)
    return {"labels": [_record_json(record, names) for record in records],
            "after": records[-1].id if len(records) == limit else None}


def build_router(ws: Workspace, max_upload_bytes: int, concurrency: int) -> APIRouter:
    """The ``/api/v1`` routes over one workspace; every route requires the UI's login and runs in ``Workers``."""
    router = APIRouter(prefix=PREFIX, dependencies=[Depends(require_login)], tags=["twist"])
    workers = Workers(concurrency)

    def user_error(error: AppUserError) -> HTTPException:
        message = str(error)
        return HTTPException(404 if message.startswith(("no image", "there is no cluster")) else 400, message)

    @router.get("/clusters", summary="every non-empty cluster: id, name, size, mean confidence")
    @workers.route
    def clusters() -> list[dict[str, Any]]:
        return [{"id": c["cluster"], "name": c["name"], "size": c["size"],
                 "mean_confidence": round(float(c["mean_confidence"]), 6)}
                for c in sorted(ws.store.summary(), key=lambda c: (-c["size"], c["cluster"]))]

    @router.get("/clusters/{cluster}/images", summary=CLUSTER_IMAGES)
    @workers.route
    def cluster_images(cluster: int, page: int = Query(0, ge=0), lowest_first: bool = False,
                       after: str | None = Query(None, description=AFTER)) -> dict[str, Any]:
        try:
            return _cluster_images(ws, cluster, page, lowest_first, parse_cursor(after))
        except AppUserError as error:
            raise user_error(error) from None

    @router.get("/review", summary="the review queue, most likely wrong first: a page of images no person moved, "
                                   "excluded or kept, each with its score and the cluster its neighbours suggest")
    @workers.route
    def review_queue(page: int = Query(0, ge=0)) -> dict[str, Any]:
        try:
            items, total = ws.review_page(page, thumbnails=False)
        except AppUserError as error:
            raise user_error(error) from None
        names = ws.names()
        return {"page": min(page, max(0, (total - 1) // PAGE_SIZE)), "page_size": PAGE_SIZE, "total": total,
                "images": [{**_record_json(item.record, names), "score": round(item.score, 6),
                            "suggestion": None if item.suggestion is None else
                            {"cluster": item.suggestion, "name": names.get(item.suggestion, "")}}
                           for item in items]}

    @router.get("/images/{image_id}", summary="one image: path, cluster, name, confidence, top-k, neighbours")
    @workers.route
    def image(image_id: int, k: int = Query(12, ge=1, le=MAX_K)) -> dict[str, Any]:
        try:
            record = ws.record(known_id(image_id))
        except AppUserError as error:
            raise user_error(error) from None
        others = [pair for pair in _search_id(ws, image_id, k + 1) if pair[0].id != image_id][:k]
        names = ws.names()
        return {**_record_json(record, names), "neighbours": _neighbours_json(others, names)}

    @router.get("/images/{image_id}/file", summary="the image, re-encoded by the app (PNG)",
                response_class=Response)
    @workers.route
    def image_file(image_id: int) -> Response:
        try:
            picture = ws.view(ws.record(known_id(image_id)))
        except AppUserError as error:
            raise user_error(error) from None
        buffer = io.BytesIO()
        picture.save(buffer, "PNG")
        return Response(buffer.getvalue(), media_type="image/png",
                        headers={"X-Content-Type-Options": "nosniff",
                                 "Content-Disposition": f'inline; filename="{image_id}.png"'})

    @router.get("/search/id/{image_id}", summary="nearest indexed images of an indexed image")
    @workers.route
    def search_by_id(image_id: int, k: int = Query(12, ge=1, le=MAX_K)) -> dict[str, Any]:
        return {"query": image_id, "neighbours": _neighbours_json(_search_id(ws, known_id(image_id), k), ws.names())}

    @router.post("/search/upload", summary="classes and nearest indexed images of an uploaded image")
    @workers.route
    def search_by_upload(file: UploadFile, k: int = Query(12, ge=1, le=MAX_K)) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="twist-api-") as folder:
            path = Path(folder) / "query"
            size = 0
            with open(path, "wb") as handle:
                while chunk := file.file.read(UPLOAD_CHUNK):
                    size += len(chunk)
                    if size > max_upload_bytes:
                        raise HTTPException(413, f"the upload is larger than {max_upload_bytes >> 20} MB")
                    handle.write(chunk)
            try:
                prediction = ws.search_file(path, k)
            except AppUserError as error:
                raise user_error(error) from None
        names = ws.names()
        return {"classes": _top_classes(prediction.probs, names),
                "neighbours": _neighbours_json(_pairs(prediction.neighbours), names)}

    vector_limit = vector_body_bytes(ws.index.dim)

    def vector_search(body: bytes) -> dict[str, Any]:
        query = parse_vector_query(body)
        pairs = _hits_to_pairs(ws, ws.index.search_vectors(unit_query(query.vector, ws.index.dim), query.k)[0])
        return {"neighbours": _neighbours_json(pairs, ws.names())}

    @router.post("/search/vector", summary="nearest indexed images of an embedding",
                 openapi_extra={"requestBody": {"required": True, "content": {
                     "application/json": {"schema": VectorQuery.model_json_schema()}}}})
    async def search_by_vector(request: Request) -> dict[str, Any]:
        """The body is read here (at most ``vector_limit`` bytes) and parsed in the workers, never on the
        event loop."""
        body = await capped_body(request, vector_limit)
        return await workers.run("search_by_vector", functools.partial(vector_search, body))

    @router.get("/labels", summary="the current (curated) labels of every image: CSV in one answer, or JSON by "
                                   "pages in id order (the answer's `after` fetches the next page, null at the end)")
    @workers.route
    def labels(format: str = Query("json", pattern="^(json|csv)$"), after: int = Query(-1, ge=-1, le=MAX_ID),
               limit: int = Query(LABELS_PAGE, ge=1, le=MAX_LABELS_PAGE)) -> Any:
        if format == "csv":
            path, remove = _temporary_csv(ws)
            return FileResponse(path, media_type="text/csv", filename="labels.csv", background=remove,
                                headers={"X-Content-Type-Options": "nosniff"})
        return _labels_page(ws, after, limit)

    return router

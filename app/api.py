"""A plain JSON API beside the UI, under ``/api/v1/``, for scripts, notebooks and labelling tools.

The routes sit on the same FastAPI application as the Gradio UI, so they share its port, its login and its
front door (:mod:`app.guard`). A script logs in either with the UI's cookie (``POST /login``) or with HTTP Basic
credentials from the same ``--auth`` list. Images are addressed by index id and handed out re-encoded by the
app, never as a file path: nothing outside the index is reachable through these routes.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import secrets
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, Field

from app.workspace import PAGE_SIZE, AppUserError, Neighbour, Workspace
from twist_core.curate.curation import Record
from twist_core.index.image_index import Hit
from twist_core.index.store import IndexUserError

PREFIX = "/api/v1"
MAX_K = 200
UPLOAD_CHUNK = 1 << 20


class VectorQuery(BaseModel):
    vector: list[float] = Field(description="an embedding of the index's dimension (the model's `embedding` output)")
    k: int = Field(10, ge=1, le=MAX_K)


def _credentials_ok(app: Any, header: str | None) -> bool:
    """HTTP Basic credentials checked against the app's ``--auth`` list in constant time."""
    if not header or not header.lower().startswith("basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:], validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    expected = app.auth.get(user) if isinstance(app.auth, dict) else None
    return expected is not None and secrets.compare_digest(password.encode(), str(expected).encode())


def require_login(request: Request) -> None:
    """The UI's rule for every route: open when the app has no ``--auth``, else a login cookie or Basic auth."""
    app = request.app
    if getattr(app, "auth", None) is None:
        return
    cookie_id = getattr(app, "cookie_id", "")
    token = (request.cookies.get(f"access-token-{cookie_id}")
             or request.cookies.get(f"access-token-unsecure-{cookie_id}"))
    if token and app.tokens.get(token):
        return
    if _credentials_ok(app, request.headers.get("authorization")):
        return
    raise HTTPException(401, "log in first: the app's --auth applies to the API", {"WWW-Authenticate": "Basic"})


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


def build_router(ws: Workspace, max_upload_bytes: int) -> APIRouter:
    """The ``/api/v1`` routes over one workspace; every route requires the UI's login."""
    router = APIRouter(prefix=PREFIX, dependencies=[Depends(require_login)], tags=["twist"])

    def user_error(error: AppUserError) -> HTTPException:
        message = str(error)
        return HTTPException(404 if message.startswith(("no image", "there is no cluster")) else 400, message)

    @router.get("/clusters", summary="every non-empty cluster: id, name, size, mean confidence")
    def clusters() -> list[dict[str, Any]]:
        return [{"id": c["cluster"], "name": c["name"], "size": c["size"],
                 "mean_confidence": round(float(c["mean_confidence"]), 6)}
                for c in sorted(ws.store.summary(), key=lambda c: (-c["size"], c["cluster"]))]

    @router.get("/clusters/{cluster}/images", summary="a page of a cluster's images, most confident first")
    def cluster_images(cluster: int, page: int = Query(0, ge=0), lowest_first: bool = False) -> dict[str, Any]:
        try:
            items, total = ws.cluster_page(cluster, page, lowest_first)
        except AppUserError as error:
            raise user_error(error) from None
        names = ws.names()
        return {"cluster": cluster, "page": page, "page_size": PAGE_SIZE, "total": total,
                "images": [_record_json(record, names) for record, _ in items]}

    @router.get("/review", summary="the review queue, most likely wrong first: a page of images no person moved, "
                                   "excluded or kept, each with its score and the cluster its neighbours suggest")
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
    def image(image_id: int, k: int = Query(12, ge=1, le=MAX_K)) -> dict[str, Any]:
        try:
            record = ws.record(image_id)
        except AppUserError as error:
            raise user_error(error) from None
        others = [pair for pair in _search_id(ws, image_id, k + 1) if pair[0].id != image_id][:k]
        names = ws.names()
        return {**_record_json(record, names), "neighbours": _neighbours_json(others, names)}

    @router.get("/images/{image_id}/file", summary="the image, re-encoded by the app (PNG)",
                response_class=Response)
    def image_file(image_id: int) -> Response:
        try:
            picture = ws.view(ws.record(image_id))
        except AppUserError as error:
            raise user_error(error) from None
        buffer = io.BytesIO()
        picture.save(buffer, "PNG")
        return Response(buffer.getvalue(), media_type="image/png",
                        headers={"X-Content-Type-Options": "nosniff",
                                 "Content-Disposition": f'inline; filename="{image_id}.png"'})

    @router.get("/search/id/{image_id}", summary="nearest indexed images of an indexed image")
    def search_by_id(image_id: int, k: int = Query(12, ge=1, le=MAX_K)) -> dict[str, Any]:
        return {"query": image_id, "neighbours": _neighbours_json(_search_id(ws, image_id, k), ws.names())}

    @router.post("/search/upload", summary="classes and nearest indexed images of an uploaded image")
    async def search_by_upload(file: UploadFile, k: int = Query(12, ge=1, le=MAX_K)) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="twist-api-") as folder:
            path = Path(folder) / "query"
            size = 0
            with open(path, "wb") as handle:
                while chunk := await file.read(UPLOAD_CHUNK):
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

    @router.post("/search/vector", summary="nearest indexed images of an embedding")
    def search_by_vector(query: VectorQuery) -> dict[str, Any]:
        vector = np.asarray(query.vector, dtype=np.float32)[None]
        if vector.shape[1] != ws.index.dim or not np.isfinite(vector).all():
            raise HTTPException(400, f"the vector must hold {ws.index.dim} finite numbers")
        pairs = _hits_to_pairs(ws, ws.index.search_vectors(vector, query.k)[0])
        return {"neighbours": _neighbours_json(pairs, ws.names())}

    @router.get("/labels", summary="the current (curated) labels of every image, as JSON or CSV")
    def labels(format: str = Query("json", pattern="^(json|csv)$")) -> Any:
        if format == "csv":
            return FileResponse(ws.export_csv(), media_type="text/csv", filename="labels.csv",
                                headers={"X-Content-Type-Options": "nosniff"})
        names = ws.names()
        return [_record_json(record, names) for record in ws.store.iter_records()]

    return router


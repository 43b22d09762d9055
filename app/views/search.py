"""The Search view: an uploaded, pasted or indexed image's class distribution and nearest neighbours.

The query is shown beside its results, and the results wrap into rows. The view shows a search from the start:
on each visit it runs the last query again (so cluster names are current), or, before any, searches from the
largest cluster's most confident image.

Shares ``send_to_search(gallery, ids_state)``: a click in that gallery opens this view on the clicked image.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from app.views import ViewContext
from app.views.shared import FIT, QUIET, WHOLE_CAPTIONS, friendly, prediction_outputs
from app.workspace import AppUserError, Workspace

CSS = "#search-query { max-width: 240px; }"


def first_query(ws: Workspace) -> int | None:
    """The largest cluster's most confident image: what the view searches from before anyone asked."""
    largest = ws.largest_cluster()
    if largest is None:
        return None
    found = ws.store.page(largest, limit=1)
    return found[0].id if found else None


def query_picture(ws: Workspace, query: Any) -> Any:
    """The query as shown: an indexed image by its id, or an uploaded file (decoded and re-encoded)."""
    if isinstance(query, str):
        return ws.upload_view(query)
    return ws.display(ws.record(int(query)))


def build(ctx: ViewContext) -> None:
    ws = ctx.ws

    @friendly
    def search_upload(path: str | None, k: int) -> tuple[pd.DataFrame, list, list[int]]:
        if not path:
            raise AppUserError("upload an image to search with")
        return prediction_outputs(ws, ws.search_file(path, int(k)))

    @friendly
    def search_id(image_id: int, k: int) -> tuple[pd.DataFrame, list, list[int]]:
        return prediction_outputs(ws, ws.search_id(int(image_id), int(k)))

    @friendly
    def shown_query(query: Any) -> tuple[Any, Any]:
        """The query's picture, and the query remembered for the next visit."""
        return (gr.skip(), gr.skip()) if query in (None, "") else (query_picture(ws, query), query)

    @friendly
    def search_again(query: Any, k: int) -> tuple:
        """On each visit: the last query run again (current names), else a first one."""
        query = first_query(ws) if query in (None, "") else query
        if query is None:
            return gr.skip()
        if isinstance(query, str):
            return (query_picture(ws, query), *search_upload(query, k), query, gr.skip())
        return (query_picture(ws, query), *search_id(query, k), query, query)

    with gr.Tab("Search", id="search") as tab:
        with gr.Row(equal_height=False):
            query = gr.Image(type="pil", interactive=False, label="Query", height=200, elem_id="search-query")
            upload = gr.File(label="Upload an image", type="filepath", elem_id="search-upload")
            paste = gr.Image(label="…or paste / drop one", type="filepath", sources=["upload", "clipboard"])
            k = gr.Slider(1, 60, 12, step=1, label="Neighbours")
        search_gallery = gr.Gallery(label="Nearest neighbours (click to search from one)", columns=8,
                                    fit_columns=False, allow_preview=False, height="auto", elem_id="search-results",
                                    elem_classes=[FIT, WHOLE_CAPTIONS])
        search_plot = gr.BarPlot(x="cluster", y="probability", label="Class distribution", sort="-y", height=220,
                                 x_label_angle=-30, y_lim=[0, 1])
        search_ids = gr.State([])
        search_from = gr.Number(None, precision=0, label="Search from image id", elem_id="search-from")
        last = gr.State(None)  # the last query: an image id, or the path of an uploaded file

    outputs = [search_plot, search_gallery, search_ids]
    remember = {"fn": shown_query, "outputs": [query, last], "api_visibility": "private", **QUIET}
    upload.upload(search_upload, [upload, k], outputs, api_name="search_upload", **QUIET).then(
        inputs=[upload], **remember)
    paste.upload(search_upload, [paste, k], outputs, api_visibility="private", **QUIET).then(inputs=[paste], **remember)
    paste.input(search_upload, [paste, k], outputs, api_name="search_paste", **QUIET).then(inputs=[paste], **remember)
    search_from.submit(search_id, [search_from, k], outputs, api_name="search_id", **QUIET).then(
        inputs=[search_from], **remember)
    tab.select(search_again, [last, k], [query, *outputs, last, search_from], api_visibility="private", **QUIET)

    def search_clicked(ids: list[int], evt: gr.SelectData) -> tuple[int, Any]:
        return ids[evt.index], gr.Tabs(selected="search")

    def send_to_search(gallery: gr.Gallery, ids: gr.State) -> None:
        gallery.select(search_clicked, [ids], [search_from, ctx.tabs], api_visibility="private").then(
            search_id, [search_from, k], outputs, api_visibility="private", **QUIET).then(
            inputs=[search_from], **remember)

    send_to_search(search_gallery, search_ids)
    ctx.share(send_to_search=send_to_search)

"""The Search view: an uploaded, pasted or indexed image's class distribution and nearest neighbours.

Shares ``send_to_search(gallery, ids_state)``: a click in that gallery opens this view on the clicked image.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from app.views import ViewContext
from app.views.shared import friendly, prediction_outputs
from app.workspace import AppUserError


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

    with gr.Tab("Search", id="search"):
        with gr.Row():
            upload = gr.File(label="Upload an image", type="filepath", elem_id="search-upload")
            paste = gr.Image(label="…or paste / drop one", type="filepath", sources=["upload", "clipboard"])
            k = gr.Slider(1, 60, 12, step=1, label="Neighbours")
        search_plot = gr.BarPlot(x="cluster", y="probability", label="Class distribution", sort="-y")
        search_gallery = gr.Gallery(label="Nearest neighbours (click to search from one)", columns=12,
                                    allow_preview=False, height="auto", elem_id="search-results")
        search_ids = gr.State([])
        search_from = gr.Number(None, precision=0, label="Search from image id", elem_id="search-from")

    outputs = [search_plot, search_gallery, search_ids]
    upload.upload(search_upload, [upload, k], outputs, api_name="search_upload")
    paste.upload(search_upload, [paste, k], outputs, api_visibility="private")
    paste.input(search_upload, [paste, k], outputs, api_name="search_paste")
    search_from.submit(search_id, [search_from, k], outputs, api_name="search_id")

    def search_clicked(ids: list[int], evt: gr.SelectData) -> tuple[int, Any]:
        return ids[evt.index], gr.Tabs(selected="search")

    def send_to_search(gallery: gr.Gallery, ids: gr.State) -> None:
        gallery.select(search_clicked, [ids], [search_from, ctx.tabs], api_visibility="private").then(
            search_id, [search_from, k], outputs, api_visibility="private")

    send_to_search(search_gallery, search_ids)
    ctx.share(send_to_search=send_to_search)

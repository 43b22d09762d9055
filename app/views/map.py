"""The Map view: a 2-D projection of the embeddings coloured by cluster; a click on a point inspects that image."""

from __future__ import annotations

from typing import Any

import gradio as gr

from app.views import ViewContext
from app.views.shared import friendly, image_panel, image_selector


def build(ctx: ViewContext) -> None:
    ws = ctx.ws

    @friendly
    def projection() -> list[dict]:
        """Every point of the map: x, y, image id and current cluster name."""
        return ws.projection()

    @friendly
    def map_picture() -> Any:
        return ws.map_picture()

    @friendly
    def map_point(x: float, y: float) -> int:
        """The image drawn nearest to a clicked pixel of the map picture."""
        return ws.map_point(float(x), float(y))

    with gr.Tab("Map", id="map"):
        map_button = gr.Button("Draw the map (PCA of the embeddings, coloured by cluster)", elem_id="draw-map")
        map_image = gr.Image(type="numpy", interactive=False, label="Click a point to see its image",
                             elem_id="map-image", buttons=["download"])
        map_id, map_detail_image, map_details, map_plot = image_panel("map-id", "map-details")
        map_gallery = gr.Gallery(label="Its nearest neighbours (click to search from one)", columns=12,
                                 allow_preview=False, height="auto")
        map_ids = gr.State([])
        map_x, map_y = gr.Number(visible=False), gr.Number(visible=False)
        gr.api(projection, api_name="projection")  # the map as data, for scripts

    map_button.click(map_picture, None, [map_image], api_name="map_picture")

    def map_clicked(evt: gr.SelectData) -> tuple[float, float]:
        x, y = evt.index
        return float(x), float(y)

    select_image = image_selector(ws)
    outputs = [map_detail_image, map_details, map_plot, map_gallery, map_ids]
    map_image.select(map_clicked, None, [map_x, map_y], api_visibility="private").then(
        map_point, [map_x, map_y], [map_id], api_name="map_point").success(
        select_image, [map_id], outputs, api_visibility="private")
    map_id.submit(select_image, [map_id], outputs, api_visibility="private")
    ctx.after_build(lambda: ctx["send_to_search"](map_gallery, map_ids))

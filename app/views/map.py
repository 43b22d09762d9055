"""The Map view: a 2-D projection of the embeddings coloured by cluster; a click on a point inspects that image.

The map picture is ``#map-picture``; the inspected image's panel is ``#map-image``, ``#map-details``, ...

The map is drawn when the tab opens (each time, so it shows the labels as curated now), and its image panel
shows an image from the start: the one last clicked (shown again with its current cluster), else the map's
first point.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from app.views import ViewContext
from app.views.shared import QUIET, friendly, image_panel, image_selector


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

    with gr.Tab("Map", id="map") as tab:
        map_image = gr.Image(type="numpy", format="png", interactive=False, elem_id="map-picture", buttons=["download"],
                             label="PCA of the embeddings, coloured by cluster: click a point to see its image")
        inspected = image_panel("map", "Its nearest neighbours (click to search from one)")
        map_x, map_y = gr.Number(visible=False), gr.Number(visible=False)
        gr.api(projection, api_name="projection")  # the map as data, for scripts

    select_image = image_selector(ws)

    @friendly
    def inspect_on_open(current: Any) -> tuple:
        """The image last clicked, else the map's first point: the panel is never empty."""
        if current in (None, ""):
            points = ws.projection()
            if not points:
                return gr.skip()
            current = points[0]["id"]
        return (int(current), *select_image(current))

    # drawn anew on each visit: current labels
    tab.select(map_picture, None, [map_image], api_name="map_picture").then(
        inspect_on_open, [inspected.image_id], [inspected.image_id, *inspected.outputs], api_visibility="private",
        **QUIET)

    def map_clicked(evt: gr.SelectData) -> tuple[float, float]:
        x, y = evt.index
        return float(x), float(y)

    map_image.select(map_clicked, None, [map_x, map_y], api_visibility="private", trigger_mode="always_last").then(
        map_point, [map_x, map_y], [inspected.image_id], api_name="map_point", **QUIET).success(
        select_image, [inspected.image_id], inspected.outputs, api_visibility="private", **QUIET)
    inspected.image_id.submit(select_image, [inspected.image_id], inspected.outputs, api_visibility="private",
                              **QUIET)
    ctx.after_build(lambda: ctx["send_to_search"](inspected.neighbours, inspected.neighbour_ids))

"""The Batch view: label uploaded images (or zips of images) with the model, as a CSV and a table (with progress)."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from app.views import ViewContext
from app.views.shared import PROGRESS, friendly

SHOWN_ROWS = 200
COLUMNS = ["file", "cluster", "cluster_name", "confidence", "error"]


def build(ctx: ViewContext) -> None:
    ws = ctx.ws

    @friendly
    def batch_label(files: list[str] | None, progress: gr.Progress = PROGRESS) -> tuple[str, pd.DataFrame]:
        out, rows = ws.batch_label(list(files or []),
                                   lambda done, total: progress((done, total), desc="labelling", unit="images"))
        return str(out), pd.DataFrame(rows[:SHOWN_ROWS], columns=COLUMNS)

    with gr.Tab("Batch", id="batch"):
        batch_files = gr.File(label="Images or a zip of images", file_count="multiple", type="filepath")
        batch_button = gr.Button("Label them")
        batch_csv = gr.File(label="Predicted labels (CSV)")
        batch_table = gr.Dataframe(pd.DataFrame(columns=COLUMNS), interactive=False, elem_id="batch-table")

    batch_button.click(batch_label, [batch_files], [batch_csv, batch_table], api_name="batch_label")

"""The Export view: labels as CSV, an ImageFolder tree (zip or on the server), Label Studio tasks.

Exports run one at a time (``concurrency_id="export"``): each streams the whole store. The zip, the long one,
shows its progress. Each export ends with a line that says what was written: the file, what it holds, its size.
"""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import gradio as gr

from app.views import ViewContext
from app.views.shared import PROGRESS, QUIET, friendly, literal


def contents(path: Path) -> str:
    """What an export file holds, counted from the file itself."""
    if path.suffix == ".csv":
        with open(path, newline="") as handle:
            rows = sum(1 for _ in csv.reader(handle)) - 1
        return f"{rows:,} images, one row each (excluded ones with status excluded)"
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            names = [name for name in archive.namelist() if not name.endswith("/")]
        return f"{len(names):,} images in {len({name.split('/')[0] for name in names}):,} cluster folders"
    return f"{len(json.loads(path.read_text())):,} Label Studio tasks"


def size_text(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{max(1, round(size / 1e3))} KB"


@friendly
def export_line(file: str | None) -> str:
    """The line under the download: the file's name, what it holds and its size."""
    if not file:
        return ""
    path = Path(file)
    return (f"Wrote **{literal(path.name)}**: {contents(path)}, {size_text(path.stat().st_size)}. Download it "
            "with the link above.")

ONE_AT_A_TIME = {"concurrency_id": "export", "concurrency_limit": 1}


def build(ctx: ViewContext) -> None:
    ws = ctx.ws

    @friendly
    def export_csv() -> str:
        return str(ws.export_csv())

    @friendly
    def export_zip(progress: gr.Progress = PROGRESS) -> str:
        return str(ws.export_zip(lambda done, total: progress((done, total), desc="zipping images", unit="images")))

    @friendly
    def export_tree(folder: str, mode: str) -> str:
        tree, counts = ws.export_tree(folder, mode)
        return f"wrote {sum(counts.values()):,} images in {len(counts)} folders to {literal(tree)}"

    @friendly
    def export_label_studio(url_prefix: str) -> tuple[str, str]:
        out, config = ws.export_label_studio(url_prefix)
        return str(out), config

    with gr.Tab("Export", id="export"):
        with gr.Row():
            csv_button = gr.Button("Labels as CSV", elem_id="export-csv")
            zip_button = gr.Button("ImageFolder tree as zip")
            ls_prefix = gr.Textbox("/data/local-files/?d=", label="Label Studio image URL prefix")
            ls_button = gr.Button("Label Studio tasks (JSON)")
        export_file = gr.File(label="Download", elem_id="export-file")
        export_status = gr.Markdown(elem_id="export-status")
        ls_config = gr.Code(label="Label Studio labelling config", language="html")
        with gr.Row():
            tree_folder = gr.Textbox(label="ImageFolder tree on the server (absolute folder)")
            tree_mode = gr.Radio(["symlink", "copy"], value="symlink", label="Tree holds")
            tree_button = gr.Button("Write tree")
        tree_status = gr.Markdown(elem_id="export-tree-status")

    said = {"fn": export_line, "inputs": [export_file], "outputs": [export_status], "api_visibility": "private"}
    csv_button.click(export_csv, None, [export_file], api_name="export_csv", **ONE_AT_A_TIME).then(**said)
    zip_button.click(export_zip, None, [export_file], api_name="export_zip", **ONE_AT_A_TIME).then(**said)
    ls_button.click(export_label_studio, [ls_prefix], [export_file, ls_config], api_name="export_label_studio",
                    **ONE_AT_A_TIME).then(**said)
    tree_button.click(export_tree, [tree_folder, tree_mode], [tree_status], api_name="export_tree", **ONE_AT_A_TIME,
                      **QUIET)

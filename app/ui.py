"""The Gradio app: the views of :mod:`app.views`, one tab each, composed into one Blocks.

Each user action is also a named API endpoint (``api_name``). Handlers only adapt
:class:`app.workspace.Workspace` results to components; a new view is one module in ``app/views/`` plus one
entry in ``VIEWS`` (see :mod:`app.views` for the convention).
"""

from __future__ import annotations

import gradio as gr

from app.views import ViewContext, batch, changes, cluster, clusters, export, merges, search, shared
from app.views import map as map_view
from app.views import review as review_view
from app.workspace import Workspace

CACHE_SWEEP = (600, 3600)  # every 10 minutes, Gradio removes the uploads and served copies older than an hour
VIEWS = (clusters, cluster, review_view, search, export, map_view, batch, merges, changes)  # in tab order


def page_css() -> str:
    """The page's own style: the shared pieces' and each view's ``CSS`` (a module may define one)."""
    return "\n".join(module.CSS for module in (shared, *VIEWS) if getattr(module, "CSS", ""))


def build_ui(ws: Workspace) -> gr.Blocks:
    """The whole app; ``ws`` is shared by every session (state lives in the curation store, not the browser)."""
    with gr.Blocks(title="TWIST clusters", delete_cache=CACHE_SWEEP) as demo:
        gr.Markdown("## TWIST: discovered clusters")
        warning = gr.Markdown(elem_id="index-warning")  # damaged index files, said on each page load
        demo.load(shared.friendly(lambda: shared.index_warning(ws)), None, [warning], api_name="index_warning")
        with gr.Tabs() as tabs:
            ctx = ViewContext(ws, demo, tabs)
            for view in VIEWS:
                view.build(ctx)
        ctx.finish()
        tabs.select(None, None, None, js=shared.CLOSE_TOASTS)  # a toast belongs to the tab it was raised in
    return demo

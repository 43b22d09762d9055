"""The app's views: one module per tab, composed by :func:`app.ui.build_ui`.

Convention for adding a view:

- Write ``app/views/<name>.py`` with ``build(ctx: ViewContext) -> None``. It opens ``with gr.Tab(label,
  id=<name>)``, lays out its components, and wires its own events; every handler goes through
  :func:`app.views.shared.friendly`, and a handler meant for scripts gets an ``api_name`` (others
  ``api_visibility="private"``).
- Components another view may use are published with ``ctx.share(name=component)``; a view uses another's with
  ``ctx["name"]``, inside ``ctx.after_build(fn)`` when that view may be built later (tabs are built in order).
- Add the module to ``VIEWS`` in :mod:`app.ui` (one line): its place there is the tab's place.
- Optional: a module-level ``CSS`` string is added to the page's style (scope it by ``elem_id``/``elem_classes``).

Shared names published by the built-in views (see each module): ``cluster`` (the Cluster view's cluster
dropdown), ``cluster_choices`` (the three cluster dropdowns that :func:`app.views.shared.fresh_choices`
brings up to date after a curation change), ``refresh_choices`` (event kwargs doing that), ``show_cluster``
(event kwargs that reload the open cluster's page, for ``.then(**ctx["show_cluster"])``), ``after_change``
(the steps that bring the Cluster view up to date after a change made in another view), and
``send_to_search`` (a function ``(gallery, ids_state)`` that makes a click in a gallery open the Search view on
that image). Reusable pieces live in :mod:`app.views.shared`: ``friendly``, ``literal`` (every text the app
did not write itself, such as a cluster name, a path or a message quoting them, goes into Markdown, HTML or an
error through it: it is then shown as text, never as markup), ``index_warning`` (the page's warning line about
the index's files), ``parse_ids``, ``cluster_number``, ``cluster_choices``/``fresh_choices``, ``QUIET`` (the
event option of actions a person can get wrong: a mistake is its toast, never an "Error" badge over the
controls), ``image_panel`` with ``image_selector`` (an inspected image, large, with its neighbours, class
chart and what its neighbours say about its cluster) and ``PROGRESS`` (the default of a handler's
``progress`` parameter, which gives a long action a progress bar).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from app.workspace import Workspace


@dataclass
class ViewContext:
    """What a view gets: the workspace, the Blocks and Tabs it lives in, and the components views share."""

    ws: Workspace
    demo: gr.Blocks
    tabs: gr.Tabs
    shared: dict[str, Any] = field(default_factory=dict)
    deferred: list[Callable[[], None]] = field(default_factory=list)

    def share(self, **items: Any) -> None:
        """Publish components (or helpers) under names other views can ask for."""
        clash = sorted(set(items) & set(self.shared))
        if clash:
            raise ValueError(f"view component name(s) already taken: {', '.join(clash)}")
        self.shared.update(items)

    def __getitem__(self, name: str) -> Any:
        if name not in self.shared:
            raise KeyError(f"no view shares {name!r} (yet: wire it in ctx.after_build); shared: "
                           f"{', '.join(sorted(self.shared))}")
        return self.shared[name]

    def after_build(self, wire: Callable[[], None]) -> None:
        """Run ``wire`` once every view is built: for events that reach into a view built later."""
        self.deferred.append(wire)

    def finish(self) -> None:
        for wire in self.deferred:
            wire()
        self.deferred.clear()

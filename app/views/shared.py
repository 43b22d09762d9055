"""Pieces several views use: error wrapping, id parsing, the cluster choices and the one-image panel.

Every handler goes through :func:`friendly`, so a user mistake (or an unexpected failure) reaches the browser
as a sentence, never a trace. Every text that did not come from the app itself (a cluster name, a file path,
a message that quotes them) goes into Markdown, HTML or an error message through :func:`literal`, so it is
shown as the characters it holds and never becomes markup (an image, a link, a formula) in anyone's browser.
"""

from __future__ import annotations

import functools
import logging
import re
import sqlite3
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from app.workspace import DISPLAY_SIDE, AppUserError, Neighbour, Prediction, Workspace
from twist_core.curate.curation import EXCLUDED, CurationError, Record
from twist_core.index.metadata import IndexUserError

log = logging.getLogger("twist.app")
TOP_CLASSES = 10  # bars in a class-distribution chart
SHOWN_PROBABILITY = 0.01  # classes below this share are left out of the chart (a photo model's 0.0000 bars)
LABEL_CHARS = 18  # a cluster name on a chart axis is cut to this many characters (long names overlapped)
FIT = "fit-content"  # a gallery as tall as its images (Gradio's default is at least 450 px on wide screens)
WHOLE_CAPTIONS = "whole-captions"  # a gallery whose captions wrap onto more lines instead of ending in "..."
# The page's style for the pieces below (wrapping captions only where the tiles are wide enough to keep most of
# the image in view: cards, search results).
CSS = (f".{FIT} .fixed-height {{ min-height: 0 !important; }}\n"
       f".{WHOLE_CAPTIONS} .caption-label {{ white-space: normal; overflow: visible; text-overflow: clip; }}")
PROGRESS = gr.Progress()  # default of a handler's ``progress`` parameter: Gradio then shows a progress bar
# Event option for actions a person can get wrong (an empty name, nothing chosen): Gradio marks every output of
# a failed event with a red "Error" badge that hides the control until it is closed; hidden progress keeps the
# controls as they were and leaves the mistake to its toast. Only for quick actions: it also hides the spinner.
QUIET = {"show_progress": "hidden"}
# Toasts belong to the tab they were raised in: a click on another tab closes them (browser-side only).
CLOSE_TOASTS = "() => document.querySelectorAll('.toast-close').forEach((button) => button.click())"


# Characters that Markdown (GFM, as Gradio renders it), HTML or Gradio's LaTeX could read as markup, anywhere in
# a line; ``://``, ``www.`` and ``@`` would become links; and a list, heading or quote marker at a line's start.
MARKUP = re.compile(r"[\\`*_~\[\]<>&|$#%!{}@]|:(?=//)|(?<=[wW]{3})\.|^[ \t]*(?:[-+=]|\d+[.)])")
CONTROL_PICTURES = {**{code: 0x2400 + code for code in range(0x20)}, 0x7F: 0x2421}  # a newline shows as ␊


def literal(text: object) -> str:
    """``text`` as Markdown and HTML that shows exactly its characters, never markup (the one escape of the app).

    Each character that could start markup becomes a numeric character reference, which Markdown and HTML
    both show as that character; control characters (a newline in a file name) show as their symbols.
    Never put the result inside a code span: there references are shown as written.
    """
    def reference(match: re.Match) -> str:
        found = match.group()
        return f"{found[:-1]}&#{ord(found[-1])};"

    return MARKUP.sub(reference, str(text).translate(CONTROL_PICTURES))


def friendly(fn: Callable) -> Callable:
    """Turn known problems into their message and anything else into one line (the trace goes to the log)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (AppUserError, CurationError, IndexUserError) as error:
            raise gr.Error(literal(error), print_exception=False) from None
        except sqlite3.DatabaseError as error:  # a file of the index or the state damaged under the server
            log.exception("request failed")
            raise gr.Error(f"a database file of the index or the state cannot be read ({literal(error)}); the server "
                           "log and the warning at the top of the page say more", print_exception=False) from None
        except Exception as error:
            log.exception("request failed")
            raise gr.Error(f"the request failed ({type(error).__name__}); the server log has details",
                           print_exception=False) from None
    return wrapper


def parse_ids(text: str | None) -> list[int]:
    """Image ids from text such as ``"12, 40 #7"``."""
    return [int(t) for t in re.findall(r"\d+", text or "")]


def cluster_number(value: Any, missing: str) -> int:
    """A cluster from a dropdown or an API call; the dropdowns accept any value, so it is checked here."""
    if value is None or value == "":
        raise AppUserError(missing)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise AppUserError(f"{value!r} is not a cluster: choose one from the list") from None


def cluster_choices(ws: Workspace, include_excluded: bool) -> list[tuple[str, int]]:
    """``(label, cluster)`` for every cluster not merged away, with its size; optionally the excluded images."""
    sizes = {c["cluster"]: c["size"] for c in ws.store.summary()}
    names = ws.names()
    merged = {c: ws.store.merged_into(c) for c in names}
    choices = [(f"{c} · {names[c]} ({sizes.get(c, 0)})", c) for c in sorted(names) if merged[c] == c]
    return [*choices, (f"excluded ({sizes.get(EXCLUDED, 0)})", EXCLUDED)] if include_excluded else choices


def index_warning(ws: Workspace) -> str:
    """The page's warning line: what is wrong with the index's files now (nothing when nothing is)."""
    ws.keep_up()
    return f"**Warning:** {literal(ws.index_problem)}" if ws.index_problem else ""


def as_cluster(value: Any) -> int | None:
    """A dropdown's value as a cluster number (None when it holds none)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def current_cluster(ws: Workspace, value: Any) -> int | None:
    """A dropdown's cluster as the store is now: one merged away is followed into the cluster it joined."""
    cluster = as_cluster(value)
    if cluster is None:
        return None
    if cluster == EXCLUDED:
        return cluster
    return ws.store.merged_into(cluster) if cluster in ws.names() else None


def fresh_choices(ws: Workspace, cluster: Any, sources: Any, target: Any) -> tuple[Any, Any, Any]:
    """The Cluster, Merge and Move dropdowns as the store is now (on each page load and after each change).

    Each keeps its value while that is a current cluster: a merged-away cluster leaves the Merge box and the
    Move target, and the Cluster dropdown follows it into the cluster it joined. (A choices-only Dropdown put
    the first cluster's bare number in the Move box, and left chips of merged clusters in Merge.)
    """
    every = cluster_choices(ws, True)
    clusters = every[:-1]  # the same list without its last entry, the excluded images (one summary query, not two)
    current = {c for _, c in clusters}
    shown = current_cluster(ws, cluster)
    kept = [c for c in map(as_cluster, sources or []) if c in current and c != shown]
    move = as_cluster(target)  # not followed into a merge: a move goes only where the person chose
    # gr.update, not gr.Dropdown: a Dropdown made with value=None selects its first choice
    return (gr.update(choices=every, value=shown), gr.update(choices=clusters, value=kept),
            gr.update(choices=clusters, value=move if move in current else None))


def fresh_target(ws: Workspace, target: Any) -> Any:
    """A "move to" dropdown as the store is now, keeping its cluster while that is current."""
    return fresh_choices(ws, None, [], target)[2]


def short(name: str, limit: int = LABEL_CHARS) -> str:
    """A cluster name cut for a chart axis, where long names ran into each other."""
    return name if len(name) <= limit else name[:limit - 1] + "…"


def distribution(ws: Workspace, probs: Any) -> pd.DataFrame:
    """The class-distribution chart: the classes that hold a real share (a photo model's chart was one bar among
    nine of 0.0000), names cut short for the axis."""
    names = ws.names()
    top = [int(c) for c in probs.argsort()[::-1][:TOP_CLASSES] if probs[c] >= SHOWN_PROBABILITY] or [
        int(probs.argmax())]
    return pd.DataFrame({"cluster": [f"{c} {short(names.get(c, ''))}" for c in top],
                         "probability": [round(float(probs[c]), 4) for c in top]})


def neighbour_items(ws: Workspace, neighbours: list[Neighbour]) -> list[tuple[str, str]]:
    names = ws.names()
    return [(str(n.thumbnail), f"#{n.record.id} · {names.get(n.record.label, 'excluded')} · sim {n.similarity:.3f}")
            for n in neighbours]


def prediction_outputs(ws: Workspace, prediction: Prediction) -> tuple[pd.DataFrame, list, list[int]]:
    """Class-distribution chart, neighbour gallery and neighbour ids of one prediction."""
    return (distribution(ws, prediction.probs), neighbour_items(ws, prediction.neighbours),
            [n.record.id for n in prediction.neighbours])


@dataclass(frozen=True)
class ImagePanel:
    """One inspected image: its id, picture, details, class chart and nearest neighbours (with their ids)."""

    image_id: gr.Number
    picture: gr.Image
    details: gr.Markdown
    plot: gr.BarPlot
    neighbours: gr.Gallery
    neighbour_ids: gr.State

    @property
    def outputs(self) -> list[Any]:
        """What :func:`image_selector`'s handler fills, in its order."""
        return [self.picture, self.details, self.plot, self.neighbours, self.neighbour_ids]


def image_panel(prefix: str, neighbours_label: str) -> ImagePanel:
    """The picture large on the left; details, neighbours and the class chart beside it, filling the row.

    The chart's axis runs from 0 to 1: fitted to the data, a confident image's one bar of 0.9999 drew as an
    empty chart (the photo models' usual case), and small shares started below the axis.

    Elements are ``#<prefix>-id``, ``#<prefix>-image``, ``#<prefix>-details``, ``#<prefix>-neighbours`` and
    ``#<prefix>-chart``.
    """
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=320):
            image_id = gr.Number(None, precision=0, label="Image id", elem_id=f"{prefix}-id")
            picture = gr.Image(type="pil", format="png", interactive=False, label="Image", height=DISPLAY_SIDE,
                               elem_id=f"{prefix}-image")
        with gr.Column(scale=3):
            details = gr.Markdown(elem_id=f"{prefix}-details")
            neighbours = gr.Gallery(label=neighbours_label, columns=6, allow_preview=False, height="auto",
                                    elem_id=f"{prefix}-neighbours", elem_classes=[FIT])
            plot = gr.BarPlot(x="cluster", y="probability", label="Class distribution", sort="-y", height=220,
                              x_label_angle=-30, y_lim=[0, 1], elem_id=f"{prefix}-chart")
    return ImagePanel(image_id, picture, details, plot, neighbours, gr.State([]))


def neighbour_note(ws: Workspace, record: Record, neighbours: list[Neighbour]) -> str:
    """What the neighbours say about the image's cluster, and its review score: a confident mistake (a turtle
    in the motorbikes at 0.99, its neighbours all turtles) shows here although its confidence looks fine."""
    others = [n.record.label for n in neighbours if n.record.id != record.id]
    elsewhere = Counter(label for label in others if label != record.label)
    if not others:
        note = "no neighbours to compare with"
    elif not elsewhere:
        note = f"all {len(others)} nearest neighbours are in its cluster"
    else:
        cluster, count = elsewhere.most_common(1)[0]
        where = f"{count} of its {len(others)} nearest neighbours are in {literal(ws.store.name(cluster))}"
        note = (f"**Its neighbours disagree:** {where}, not in {literal(ws.store.name(record.label))}"
                if 2 * sum(elsewhere.values()) > len(others) else where)
    score = ws.review_scores([record.id]).get(record.id)
    if score is not None:
        note += f"  \nreview score {score[0]:.2f} (higher than {int(100 * (1 - score[1]))} % of the images)"
    return note


def image_selector(ws: Workspace) -> Callable[[int], tuple]:
    """The handler behind :func:`image_panel`: picture, details, chart, neighbours and their ids of one image."""
    @friendly
    def select_image(image_id: int) -> tuple[Any, str, pd.DataFrame, list, list[int]]:
        record, prediction = ws.describe(int(image_id))
        details = (f"**#{record.id}** {literal(record.path)}  \nlabel: {literal(ws.store.name(record.label))} "
                   f"({record.status}) · predicted: {literal(ws.store.name(record.predicted))} · "
                   f"confidence {record.confidence or 0:.3f}  \n{neighbour_note(ws, record, prediction.neighbours)}")
        return (ws.display(record), details, *prediction_outputs(ws, prediction))

    return select_image

"""Issue 36, the app's views: cluster names are text in every pane, and the merge plan counts real clusters.

A live ``twist app`` on loopback is curated through its API with names that are markup (a Markdown image, an
HTML image, both pointing at a tiny HTTP server of the test); a real Chromium then opens every view that shows
names. No view may make the browser fetch anything from that server, and the names must read as typed.
"""

from __future__ import annotations

import html
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import chromium_page, needs_chromium, start_app_server, stop_app_server
from gradio_client import Client
from markdown_it import MarkdownIt

from app.views.shared import literal
from twist_core.index.image_index import IndexReader

HOSTILE_TEXTS = ["![t](http://127.0.0.1:17999/x.png)", "<img src=http://127.0.0.1:17999/y.png>",
                 "[link](javascript:alert(1)) <a href=x>a</a> www.example.org a@b.co http://127.0.0.1/z",
                 "$$\\href{http://127.0.0.1/}{x}$$ %%%LATEX_BLOCK_0%%%", "**bold** _it_ ~~s~~ `code` | a | b |",
                 "# heading", "- item", "12. item", "> quote", "a\nb\r\n\tc &amp; &#60; \\*", "plain name 3"]


@pytest.fixture(scope="module")
def listener() -> Iterator[list[str]]:
    """A loopback HTTP server that records every path asked of it: the names point at it."""
    asked: list[str] = []

    class Record(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Record)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    asked.append(f"port {server.server_address[1]}")  # asked[0]: where it listens, not a request
    try:
        yield asked
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def served(app_bundle: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    state = tmp_path_factory.mktemp("round_two_views") / "state"
    process, url = start_app_server(app_bundle, state)
    index = IndexReader.open(app_bundle["index"], "cpu")
    sizes = sorted(index.cluster_summary(), key=lambda c: (-c["size"], c["cluster"]))
    first = {c["cluster"]: [r.id for r in index.records(c["cluster"], limit=3)] for c in sizes}
    index.close()
    try:
        yield {"url": url, "clusters": [c["cluster"] for c in sizes], "ids": first, **app_bundle}
    finally:
        stop_app_server(process)


def rendered(markdown: str) -> str:
    """HTML of a CommonMark (+ tables and strikethrough) renderer, as a second opinion beside the browser's."""
    return MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(markdown)


@pytest.mark.parametrize("text", HOSTILE_TEXTS)
def test_literal_text_renders_as_exactly_its_characters_and_no_markup(text: str) -> None:
    shown = rendered(literal(text))
    assert shown.startswith("<p>") and shown.endswith("</p>\n") and shown.count("<") == 2, shown
    expected = text.translate({code: 0x2400 + code for code in range(0x20)})
    assert html.unescape(shown[3:-5]) == expected
    assert "$$" not in literal(text) and "://" not in literal(text)  # no formula, no bare link for GFM
    assert html.unescape(literal(text)) == expected  # HTML (an error toast) shows the same characters


def test_names_in_status_history_and_plan_reach_the_panes_as_text(served: dict) -> None:
    """The API values of the panes (the Markdown the browser renders) hold the names escaped, never markup."""
    client = Client(served["url"], verbose=False)
    largest = served["clusters"][0]
    status, history, *_ = client.predict(largest, HOSTILE_TEXTS[1], api_name="/rename_cluster")
    for pane in (status, history):
        assert "<img" not in rendered(pane) and HOSTILE_TEXTS[1] in html.unescape(pane), pane
    _, info, _ = client.predict(largest, 0, False, 0, 1, api_name="/open_cluster")
    assert "<img" not in rendered(info) and HOSTILE_TEXTS[1] in html.unescape(info)
    _, _, summary = client.predict("size", api_name="/overview")
    assert "<code>" not in rendered(summary) and str(served["images"]) in html.unescape(summary)
    client.predict(api_name="/undo")


def test_merge_plan_counts_clusters_without_the_excluded_images(served: dict) -> None:
    """Issue 36, item 18: after excluding one image the plan said "there are 11 clusters now" for 10."""
    client = Client(served["url"], verbose=False)
    clusters = len(served["clusters"])
    assert clusters >= 2, "the tiny model put every image in one cluster"
    client.predict(str(served["ids"][served["clusters"][0]][0]), api_name="/exclude_images")
    try:
        with pytest.raises(Exception, match=rf"from 1 to {clusters - 1} \(there are {clusters} clusters now\)"):
            client.predict(clusters, "modularity", api_name="/preview_plan")
        _, _, summary = client.predict("size", api_name="/overview")
        assert f"in {clusters} non-empty clusters" in summary
    finally:
        client.predict(api_name="/undo")


@needs_chromium
def test_names_that_are_markup_never_make_the_browser_fetch_and_read_as_typed(served: dict,
                                                                              listener: list[str]) -> None:
    """Issue 36, item 5: a name holding an image made every viewer's browser fetch its URL."""
    from playwright.sync_api import expect

    port = listener[0].split()[1]
    markdown_image = f"![t](http://127.0.0.1:{port}/markdown.png)"
    html_image = f"<img src=http://127.0.0.1:{port}/html.png>"
    renamed = f"![u](http://127.0.0.1:{port}/status.png) <img src=http://127.0.0.1:{port}/status.png>"
    client = Client(served["url"], verbose=False)
    largest, second = served["clusters"][:2]
    client.predict(largest, markdown_image, api_name="/rename_cluster")
    client.predict(second, html_image, api_name="/rename_cluster")
    client.predict(str(served["ids"][largest][1]), second, api_name="/move_images")
    try:
        with chromium_page() as page:
            page.goto(served["url"])
            expect(page.locator("#summary")).to_contain_text("images in")
            expect(page.locator("#cluster-cards")).to_contain_text(markdown_image)
            expect(page.locator("#cluster-cards")).to_contain_text(html_image)

            page.get_by_role("tab", name="Cluster", exact=True).click()
            expect(page.locator("#page-info")).to_contain_text(markdown_image)
            page.locator("#new-name textarea").fill(renamed)
            page.locator("#rename").click()
            expect(page.locator("#status")).to_contain_text(renamed)
            expect(page.get_by_text(f"to '{html_image}'").first).to_be_visible()  # the history line of the API rename
            page.locator("#new-name textarea").fill(html_image)
            page.locator("#rename").click()  # refused: the error names the name
            expect(page.get_by_text(f"is already called '{html_image}'").first).to_be_visible()
            page.locator("#cluster-gallery button.thumbnail-item").first.click()
            expect(page.locator("#inspect-details")).to_contain_text(renamed)

            page.get_by_role("tab", name="Review").click()
            expect(page.locator("#review-gallery button.thumbnail-item").first).to_be_visible()
            expect(page.locator("#review-details")).to_contain_text("review score")

            page.get_by_role("tab", name="Suggested merges").click()
            page.locator("#suggest-merges").click()
            expect(page.locator("#merge-pairs")).to_contain_text(html_image)
            page.locator("#merge-plan-preview").click()
            expect(page.locator("#merge-plan")).to_contain_text(renamed)
            page.wait_for_timeout(1_500)  # time for any fetch a pane would have started
    finally:
        for _ in range(4):
            client.predict(api_name="/undo")
    assert listener[1:] == [], f"the browser fetched {listener[1:]} from a cluster name"

"""A live ``twist app --auth-file``, after the review of issue 36: the login throttle, the vector search body,
bodies that no route reads, and the files of Gradio's upload route.

Only credentials found right clear a client's failed logins; a vector search body is capped to what a vector of
the index's dimension needs and parsed off the event loop; a body no route reads is never drained; uploaded files
stay bounded while the app runs and are gone once it exits. Each test speaks from its own loopback address.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import stop_app_server
from test_round_two_front_door import (
    PASSWORD,
    THROTTLED_S,
    USER,
    client,
    start,
)

UPLOAD_MB = 20  # the default --max-upload-mb: a vector search body used to be allowed all of it
OFFERED_BYTES = 96 << 20  # what a hostile client streams to a route that does not read it
UPLOAD_LIMIT_MB = 2


@pytest.fixture(scope="module")
def server(app_bundle: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    process, url, _ = start(app_bundle, tmp_path_factory.mktemp("server"), "--max-upload-mb", str(UPLOAD_MB))
    httpx.get(url + "api/v1/clusters", auth=(USER, PASSWORD), timeout=60)  # the first request sets up serving
    try:
        yield {"url": url, "pid": process.pid}
    finally:
        stop_app_server(process)


# ---- only verified credentials clear failed logins


@pytest.mark.parametrize("guess, source", [("form", "127.0.0.61"), ("api", "127.0.0.62")])
def test_a_wrong_basic_header_on_an_open_page_does_not_clear_failed_logins(server: dict, guess: str,
                                                                         source: str) -> None:
    """Each wrong guess is followed by ``GET /`` with wrong HTTP Basic credentials, which Gradio answers 200:
    that answer used to clear the failures, so the delays never grew (0.5 s for five guesses, not 3.1 s)."""
    url = server["url"]
    with client(source) as http:
        started = time.monotonic()
        for attempt in range(5):
            if guess == "form":
                status = http.post(url + "login", data={"username": USER, "password": f"guess{attempt}"}).status_code
            else:
                status = http.get(url + "api/v1/clusters", auth=(USER, f"guess{attempt}")).status_code
            assert status in (400, 401)
            assert http.get(url, auth=("x", "y")).status_code == 200
        took = time.monotonic() - started
        assert took > THROTTLED_S, f"five wrong guesses took {took:.2f} s: the wrong Basic header reset the delay"
        assert http.get(url + "api/v1/clusters", auth=(USER, PASSWORD)).status_code == 200

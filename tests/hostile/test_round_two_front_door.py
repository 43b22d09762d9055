"""The front door of a live ``twist app --auth-file``, round two: bodies, proxies and queued logins.

Bodies are refused before they are read: a stranger's upload, or a member's upload over ``--max-upload-mb``,
is answered 401 / 413 after a few MB at most, whether it announces its length or is chunked, and the server's
memory and temporary folder do not grow. The login throttle keys on the socket peer; ``X-Forwarded-For`` counts
only from a ``--trusted-proxy``. Each test speaks from its own loopback address (127.0.0.x) so the throttle
state of one test never reaches another.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import REPO, start_app_server, stop_app_server

USER, PASSWORD = "ann", "correct horse battery staple"
MAX_UPLOAD_MB = 2
BODY_BYTES = 256 << 20  # what the hostile client offers; the answer must come long before
ANSWERED_WITHIN_BYTES = 24 << 20  # socket buffers hold a few MB; a read body would be all 256 MB
GROWTH_LIMIT = 16 << 20  # memory or temporary files the server may gain while refusing
WRONG_LOGINS = 5  # throttled: 0.1 + 0.2 + 0.4 + 0.8 + 1.6 = 3.1 s; one per fresh client: 0.5 s
THROTTLED_S = 2.5
UNTHROTTLED_S = 2.0  # 0.5 s of delays and the requests themselves, on a busy machine


def start(app_bundle: dict[str, Path], base: Path, *extra: str) -> tuple[subprocess.Popen, str, Path]:
    users = base / "users.txt"
    users.write_text(f"{USER}:{PASSWORD}\n")
    server_tmp = base / "server-tmp"
    server_tmp.mkdir()
    process, url = start_app_server(app_bundle, base / "state", "--auth-file", str(users), "--no-warm-thumbnails",
                                    "--max-upload-mb", str(MAX_UPLOAD_MB), *extra, env={"TMPDIR": str(server_tmp)})
    return process, url, server_tmp


@pytest.fixture(scope="module")
def door(app_bundle: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    process, url, server_tmp = start(app_bundle, tmp_path_factory.mktemp("front_door"))
    login_cookie(url)  # the first requests import and set up what serving needs: not counted as growth
    httpx.get(url + "api/v1/clusters", auth=(USER, PASSWORD), timeout=60)
    try:
        yield {"url": url, "pid": process.pid, "tmp": server_tmp}
    finally:
        stop_app_server(process)


@pytest.fixture(scope="module")
def behind_proxy(app_bundle: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    process, url, _ = start(app_bundle, tmp_path_factory.mktemp("behind_proxy"), "--trusted-proxy", "127.0.0.1")
    try:
        yield {"url": url}
    finally:
        stop_app_server(process)


def client(source: str) -> httpx.Client:
    """An HTTP client whose connections come from ``source`` (any 127.0.0.x is loopback on Linux)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=60)


def random_address() -> str:
    return ".".join(str(random.randint(1, 254)) for _ in range(4))


# ---- bodies refused before they are read


def rss_peak(pid: int) -> int:
    """The process's peak resident memory (VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmHWM line")


def temp_bytes(pid: int, folder: Path) -> int:
    """Bytes in the server's temporary folder, counting files it holds open there after unlinking them."""
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith(str(folder)) and "(deleted)" in os.readlink(fd):
                total += fd.stat().st_size
        except OSError:
            continue
    return total


def offer_body(url: str, path: str, headers: dict[str, str], chunked: bool, watch: dict) -> tuple[int, int]:
    """Stream ``BODY_BYTES`` to ``path`` until the server answers; returns (status, bytes sent by then).

    Sampled while sending: the largest growth of the server's temporary folder, in ``watch["temp_growth"]``.
    """
    parts = urllib.parse.urlsplit(url)
    framing = {"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": str(BODY_BYTES)}
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": parts.netloc, **headers, **framing}.items())
    filler = FILLER[headers["Content-Type"]]
    pieces = [PREFIX[headers["Content-Type"]] + filler[:-len(PREFIX[headers["Content-Type"]])], filler]
    base_temp, sent, pending, answer, sending = temp_bytes(watch["pid"], watch["tmp"]), 0, b"", b"", True
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode())
        sock.setblocking(False)
        while b"\r\n" not in answer:
            wanted = [sock] if sending and (sent < BODY_BYTES or pending) else []
            readable, writable, _ = select.select([sock], wanted, [], 60)
            if not readable and not writable:
                raise AssertionError(f"no answer after {sent >> 20} MB")
            if readable:
                answer += sock.recv(65536) or b"closed\r\n"
            elif writable:
                piece = pieces[min(sent, 1)]  # a form or JSON that starts well, then goes on and on
                pending = pending or (f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece)
                try:
                    count = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):  # the server answered and closed: read it
                    sending, count = False, 0
                pending, sent = pending[count:], sent + count
                if sent % (8 << 20) < count:
                    watch["temp_growth"] = max(watch.get("temp_growth", 0),
                                               temp_bytes(watch["pid"], watch["tmp"]) - base_temp)
    return int(answer.split()[1]), sent


def login_cookie(url: str) -> str:
    answer = httpx.post(url + "login", data={"username": USER, "password": PASSWORD}, timeout=60)
    assert answer.status_code == 200
    return "; ".join(f"{name}={value}" for name, value in answer.cookies.items())


MULTIPART = {"Content-Type": "multipart/form-data; boundary=xyz"}
JSON = {"Content-Type": "application/json"}
PREFIX = {MULTIPART["Content-Type"]: b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
                                   b"Content-Type: image/png\r\n\r\n",
          JSON["Content-Type"]: b'{"vector": ['}
FILLER = {MULTIPART["Content-Type"]: b"x" * (1 << 20), JSON["Content-Type"]: b"0," * (1 << 19)}


@pytest.mark.parametrize("route, headers, chunked, logged_in, status", [
    ("/api/v1/search/upload", MULTIPART, False, False, 401),
    ("/api/v1/search/upload", MULTIPART, True, False, 401),
    ("/api/v1/search/vector", JSON, False, False, 401),
    ("/api/v1/search/vector", JSON, True, False, 401),
    ("/gradio_api/upload", MULTIPART, True, False, 401),
    ("/api/v1/search/upload", MULTIPART, False, True, 413),
    ("/api/v1/search/upload", MULTIPART, True, True, 413),
    ("/api/v1/search/vector", JSON, True, True, 413),
    ("/gradio_api/upload", MULTIPART, False, True, 413),
    ("/gradio_api/upload", MULTIPART, True, True, 413),
])
def test_a_large_body_is_refused_before_it_is_read(door: dict, route: str, headers: dict, chunked: bool,
                                                    logged_in: bool, status: int) -> None:
    credentials = {"Cookie": login_cookie(door["url"])} if logged_in else {}
    watch = {"pid": door["pid"], "tmp": door["tmp"]}
    peak_before = rss_peak(door["pid"])
    answer, sent = offer_body(door["url"], route, {**headers, **credentials}, chunked, watch)
    assert answer == status
    assert sent < ANSWERED_WITHIN_BYTES, f"the answer came after {sent >> 20} MB of the body"
    assert rss_peak(door["pid"]) - peak_before < GROWTH_LIMIT
    assert watch.get("temp_growth", 0) < GROWTH_LIMIT


def test_basic_credentials_pass_the_body_check(door: dict) -> None:
    vector = {"vector": [0.5] * 4, "k": 3}
    assert httpx.post(door["url"] + "api/v1/search/vector", json=vector, timeout=60).status_code == 401
    answer = httpx.post(door["url"] + "api/v1/search/vector", json=vector, auth=(USER, PASSWORD), timeout=60)
    assert answer.status_code == 400 and "finite numbers" in answer.json()["detail"]  # a wrong dimension


# ---- the throttle keys on the socket peer


def wrong_logins_take(http: httpx.Client, url: str, api: bool, forwarded: list[str]) -> float:
    start = time.monotonic()
    for address in forwarded:
        headers = {"X-Forwarded-For": address}
        if api:
            status = http.get(url + "api/v1/clusters", auth=(USER, "wrong"), headers=headers).status_code
        else:
            status = http.post(url + "login", data={"username": USER, "password": "wrong"}, headers=headers).status_code
        assert status in (400, 401)
    return time.monotonic() - start


@pytest.mark.parametrize("api", [False, True])
def test_a_forged_forwarded_for_does_not_escape_the_throttle(door: dict, api: bool) -> None:
    with client("127.0.0.1") as http:  # loopback itself, whose header the server used to believe
        login_cookie(door["url"])  # a success starts the count afresh
        took = wrong_logins_take(http, door["url"], api, [random_address() for _ in range(WRONG_LOGINS)])
    assert took > THROTTLED_S, f"{WRONG_LOGINS} wrong logins under fresh X-Forwarded-For took {took:.2f} s"


def test_a_trusted_proxy_forwards_the_client_address(behind_proxy: dict) -> None:
    with client("127.0.0.1") as proxy:
        took = wrong_logins_take(proxy, behind_proxy["url"], False, [random_address() for _ in range(WRONG_LOGINS)])
        assert took < UNTHROTTLED_S, "clients behind the trusted proxy were throttled as one"
        took = wrong_logins_take(proxy, behind_proxy["url"], True, ["198.51.100.7"] * WRONG_LOGINS)
        assert took > THROTTLED_S, "one client behind the trusted proxy escaped the throttle"
    with client("127.0.0.23") as stranger:  # not the named proxy: its header is ignored
        took = wrong_logins_take(stranger, behind_proxy["url"], False, [random_address() for _ in range(WRONG_LOGINS)])
    assert took > THROTTLED_S


@pytest.mark.parametrize("value", ["not-an-address", "10.0.0.0/33"])
def test_a_bad_trusted_proxy_is_one_line_and_exit_2(value: str) -> None:
    result = subprocess.run([sys.executable, "-m", "twist_core.cli", "app", "--trusted-proxy", value], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--trusted-proxy" in result.stderr and value in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_the_trusted_proxy_option_is_documented() -> None:
    result = subprocess.run([sys.executable, "-m", "twist_core.cli", "app", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert "--trusted-proxy" in result.stdout


# ---- queued wrong logins never delay the right one


def in_background(count: int, guess: Callable[[], None]) -> None:
    """``count`` threads running ``guess`` at once; they drain the server's queue after the test has ended."""
    def quietly() -> None:
        with contextlib.suppress(httpx.HTTPError):
            guess()

    for _ in range(count):
        threading.Thread(target=quietly, daemon=True).start()


def test_the_right_password_gets_in_while_wrong_ones_are_queued(door: dict) -> None:
    source, url = "127.0.0.31", door["url"]

    def guess() -> None:
        with client(source) as http:
            wrong_logins_take(http, url, False, ["10.0.0.1"])

    in_background(15, guess)
    time.sleep(0.5)  # all 15 are in the server's hands now
    with client(source) as http:
        start = time.monotonic()
        status = http.post(url + "login", data={"username": USER, "password": PASSWORD}, timeout=10).status_code
        took = time.monotonic() - start
    assert status == 200 and took < 1.0, f"the right password took {took:.2f} s"


def test_the_queue_of_wrong_logins_is_bounded(door: dict) -> None:
    source, url, answers = "127.0.0.32", door["url"], []

    def guess() -> None:
        with client(source) as http:
            start = time.monotonic()
            status = http.post(url + "login", data={"username": USER, "password": "wrong"}).status_code
            answers.append((status, time.monotonic() - start))

    in_background(30, guess)
    time.sleep(2.0)  # the refusals come at once; the 16 queued ones are answered over the next 30 s
    refused = [took for status, took in answers if status == 429]
    assert len(refused) >= 10 and max(refused) < 1.0, answers


# ---- JSON answers


def test_json_answers_are_never_sniffed_and_malformed_strangers_get_401(door: dict) -> None:
    url = door["url"] + "api/v1/"
    assert httpx.get(url + "clusters", auth=(USER, PASSWORD)).headers["x-content-type-options"] == "nosniff"
    refused = httpx.get(url + "clusters")
    assert refused.status_code == 401 and refused.headers["x-content-type-options"] == "nosniff"
    assert httpx.post(url + "search/vector", content=b"{not json", headers=JSON).status_code == 401
    assert httpx.post(url + "search/vector", json={"vector": "x"}).status_code == 401
    assert httpx.get(url + "clusters/abc/images").status_code == 401
    assert httpx.get(url + "images/abc", auth=(USER, "wrong")).status_code == 401
    malformed = httpx.post(url + "search/vector", json={"vector": "x"}, auth=(USER, PASSWORD))
    assert malformed.status_code == 422 and malformed.headers["x-content-type-options"] == "nosniff"

"""The app's front door, as one ASGI middleware: who may send a body, how large, which files may leave the
server, and how fast logins may fail.

Bodies: when the app has a login, a request that could carry a body (anything but GET, HEAD, OPTIONS) and every
``/api/v1`` request is answered 401 before a byte of its body is read, unless it carries the login (cookie or
HTTP Basic); only the login form itself is open, and its body is capped at a few KB. A body larger than the
route's limit (``--max-upload-mb``, with room for the form around it; for the vector search, what a vector of
the index's dimension needs) is answered 413 at once when its ``Content-Length`` says so, and as soon as it
passes the limit when it is streamed (chunked); either way the connection is closed, so the rest is never read.
A stranger's body is refused on every route, even one that takes none (a GET or OPTIONS sent with a body), and
a body the route answers without reading closes the connection too, so the server never drains it.

Files: the app never hands out a dataset path. Thumbnails, detail views, the map and exports are written by
the app and copied by Gradio into its own cache folder, so only that folder is served; a request for anything
else (an ``evil.html`` among the images, the index, the model, the curation store) is answered 404, whatever
the encoding. What is served carries ``X-Content-Type-Options: nosniff``; only raster images are shown
inline, anything else (CSV, zip, JSON) is an attachment, so no served file can run script in the app's origin.
JSON answers carry ``nosniff`` too.

Uploads: what Gradio's upload route keeps is bounded: after each upload the oldest uploaded files are removed
until those left hold at most ``UPLOADS_KEPT_REQUESTS`` full uploads' worth (see also app/main.py, which gives
the app a folder of its own, ages its files out and removes it at exit).

Logins: a failed login from one client is answered only after a delay that doubles with each failure
(capped), one failure after another, so guessing a password takes hours, not seconds; a right password is
answered at once, even while wrong ones wait. Only credentials found right clear the count: a wrong HTTP Basic
header on a page that answers anyone (``GET /``) clears nothing. A client may have ``WAITING_ATTEMPTS`` attempts
in flight; more are answered 429 at once, before their password is looked at. The client is the socket peer:
``X-Forwarded-For`` counts only from the proxies named with ``--trusted-proxy`` (uvicorn applies that rule before
this middleware runs), so behind such a proxy each user has their own delay, and a forged header gains nothing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread
from starlette.requests import Request

INLINE_TYPES = frozenset({"image/jpeg", "image/png", "image/webp", "image/gif"})
FILE_ROUTE = re.compile(r"(?:/file=|/gradio_api/file/)(?P<path>.*)$")  # Gradio's routes that serve a file path
LOGIN_ROUTE = re.compile(r"/login/?$")
FAILED_LOGIN = frozenset({400, 401, 403})  # the login form's answers to wrong credentials
FAILED_BASIC = frozenset({401})  # a route's answer to wrong HTTP Basic credentials
WAITING_ATTEMPTS = 16  # requests carrying a password one client may have in flight; more are answered 429
API_PREFIX = "/api/v1"
UPLOAD_ROUTE = re.compile(r"^(?:/gradio_api)?/upload/?$")  # Gradio's route for the files of an upload component
VECTOR_ROUTE = re.compile(r"^/api/v1/search/vector/?$")
VECTOR_NUMBER_BYTES = 32  # one float as JSON writes it, with its comma and indentation ("-1.2345678901234567e-05, ")
VECTOR_SLACK_BYTES = 4 << 10  # the braces, "k" and whitespace around the numbers
UPLOAD_ROUTE_FILES = 8  # one drop on an upload component may send several files in one request
UPLOADS_KEPT_REQUESTS = 4  # the uploaded files kept at most: this many full requests to the upload route
FORM_BYTES = 64 << 10  # room for the multipart form around an upload
LOGIN_BODY_BYTES = 16 << 10
BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class FileGuard:
    """Serve only regular files inside ``roots`` (resolved, so neither ``..`` nor a symlink leads out)."""

    def __init__(self, roots: list[str | Path]) -> None:
        self.roots = [Path(root).resolve() for root in roots]

    def allows(self, requested: str) -> bool:
        if not requested or "://" in requested or "\x00" in requested:
            return False
        try:
            real = Path(os.path.abspath(requested)).resolve()
            return real.is_file() and any(real.is_relative_to(root) for root in self.roots)
        except (OSError, ValueError):
            return False


def safe_file_name(requested: str) -> str:
    """The last part of a path, reduced to characters that cannot break a header."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", requested.rsplit("/", 1)[-1])[:100].lstrip(".")
    return name or "file"


def file_headers(headers: list[tuple[bytes, bytes]], requested: str) -> list[tuple[bytes, bytes]]:
    """Headers of a served file: nosniff, and inline only for raster images (anything else downloads)."""
    kept = [(k, v) for k, v in headers
            if k.lower() not in (b"content-type", b"content-disposition", b"x-content-type-options")]
    content_type = dict((k.lower(), v) for k, v in headers).get(b"content-type", b"").decode("latin-1")
    content_type = content_type.split(";")[0].strip().lower()
    name = safe_file_name(requested)
    if content_type in INLINE_TYPES:
        kind, disposition = content_type, f'inline; filename="{name}"'
    else:
        kind, disposition = "application/octet-stream", f'attachment; filename="{name}"'
    return [*kept, (b"content-type", kind.encode()), (b"content-disposition", disposition.encode()),
            (b"x-content-type-options", b"nosniff")]


class LoginThrottle:
    """Per-client delay after each failed login: ``first_delay * 2**(failures - 1)`` seconds, at most ``max_delay``.

    Failures are answered one at a time per client, each after its delay, so parallel guesses gain nothing; a
    success is answered at once. Only credentials checked as right clear the failures (the login form's
    success, HTTP Basic that matches the ``--auth`` list); any other answer, even a 200, leaves them. ``enter``
    admits at most ``waiting`` attempts of one client at a time.
    """

    def __init__(self, first_delay: float = 0.1, max_delay: float = 2.0, forget_after: float = 900.0,
                 waiting: int = WAITING_ATTEMPTS) -> None:
        self.first_delay, self.max_delay, self.forget_after = first_delay, max_delay, forget_after
        self.waiting = waiting
        self._failures: dict[str, tuple[int, float]] = {}
        self._open: dict[str, int] = {}
        self._turns: dict[str, asyncio.Lock] = {}

    def enter(self, client: str) -> bool:
        """Admit one more attempt of ``client``; False when it already has ``waiting`` in flight."""
        if self._open.get(client, 0) >= self.waiting:
            return False
        self._open[client] = self._open.get(client, 0) + 1
        return True

    def leave(self, client: str) -> None:
        self._open[client] -= 1
        if not self._open[client]:  # nobody of this client holds or waits for its turn
            del self._open[client]
            self._turns.pop(client, None)

    async def hold_failure(self, client: str) -> None:
        """Wait for this client's earlier failures to be answered, then for this failure's delay."""
        async with self._turns.setdefault(client, asyncio.Lock()):
            await asyncio.sleep(self.failed(client))

    def failed(self, client: str) -> float:
        """Count a failure; returns how long to hold its answer back."""
        count, last = self._failures.get(client, (0, 0.0))
        now = time.monotonic()
        count = 1 if now - last > self.forget_after else count + 1
        self._failures[client] = (count, now)
        return min(self.first_delay * 2 ** (count - 1), self.max_delay)

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)


def header(scope: Scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope.get("headers", []) if key.lower() == name), None)


def has_basic_credentials(scope: Scope) -> bool:
    return (header(scope, b"authorization") or b"")[:6].lower() == b"basic "


def basic_credentials_ok(app: Any, authorization: str | None) -> bool:
    """HTTP Basic credentials checked against the app's ``--auth`` list in constant time."""
    if not authorization or not authorization.lower().startswith("basic "):
        return False
    try:
        user, _, password = base64.b64decode(authorization[6:], validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    expected = app.auth.get(user) if isinstance(app.auth, dict) else None
    return expected is not None and secrets.compare_digest(password.encode(), str(expected).encode())


def logged_in(request: Request) -> bool:
    """The UI's rule: open when the app has no ``--auth``, else Gradio's login cookie or HTTP Basic credentials."""
    app = request.app
    if getattr(app, "auth", None) is None:
        return True
    cookie_id = getattr(app, "cookie_id", "")
    token = (request.cookies.get(f"access-token-{cookie_id}")
             or request.cookies.get(f"access-token-unsecure-{cookie_id}"))
    if token and app.tokens.get(token):
        return True
    return basic_credentials_ok(app, request.headers.get("authorization"))


def has_body(scope: Scope) -> bool:
    """The request announces a body: a non-zero ``Content-Length`` or any ``Transfer-Encoding``."""
    return content_length(scope) not in (None, 0) or header(scope, b"transfer-encoding") is not None


def basic_verified(scope: Scope) -> Callable[[int], bool]:
    """Whether a request's HTTP Basic credentials are right, whatever the route answered (checked when asked)."""
    def verified(_status: int) -> bool:
        authorization = (header(scope, b"authorization") or b"").decode("latin-1")
        return basic_credentials_ok(scope.get("app"), authorization)

    return verified


def login_verified(status: int) -> bool:
    """The login form answers 2xx only to right credentials."""
    return status < 300


def vector_body_bytes(dim: int) -> int:
    """Largest body of a vector search: ``dim`` numbers as JSON writes them, and the object around them."""
    return dim * VECTOR_NUMBER_BYTES + VECTOR_SLACK_BYTES


def content_length(scope: Scope) -> int | None:
    """The announced body size; a malformed one counts as unbounded."""
    value = header(scope, b"content-length")
    if value is None:
        return None
    return int(value) if value.strip().isdigit() else 1 << 62


async def refuse(send: Send, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """A JSON error answered before the body is read; the connection closes so the rest is never received."""
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"x-content-type-options", b"nosniff"), (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


def nosniff_json(send: Send, always: bool) -> Send:
    """``send`` that adds ``X-Content-Type-Options: nosniff`` to JSON answers (to every answer when ``always``)."""
    async def send_nosniff(message: dict) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            names = {k.lower() for k, _ in headers}
            kind = dict((k.lower(), v) for k, v in headers).get(b"content-type", b"")
            if b"x-content-type-options" not in names and (always or kind.startswith(b"application/json")):
                message = {**message, "headers": [*headers, (b"x-content-type-options", b"nosniff")]}
        await send(message)

    return send_nosniff


class BodyCap:
    """A request's body passed on until it exceeds ``limit`` bytes: then 413, and the app is told the client left.

    An answer sent before the whole body was read closes the connection: the server would otherwise read (drain)
    the rest, however large, to reach the next request on it.
    """

    def __init__(self, limit: int, receive: Receive, send: Send, unread: bool) -> None:
        self.limit, self._receive, self._send = limit, receive, send
        self.size, self.started, self.refused, self.unread = 0, False, False, unread

    async def receive(self) -> dict:
        if self.refused:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request":
            self.unread = self.unread and message.get("more_body", False)
            self.size += len(message.get("body", b""))
            if self.size > self.limit:
                self.refused = True
                if not self.started:
                    await refuse(self._send, 413, too_large(self.limit))
                return {"type": "http.disconnect"}
        return message

    async def send(self, message: dict) -> None:
        if self.refused:
            return  # the app's answer to the disconnect: the client has its 413 already
        if message["type"] == "http.response.start":
            self.started = True
            if self.unread:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
        await self._send(message)

    async def run(self, app: Callable, scope: Scope) -> None:
        try:
            await app(scope, self.receive, self.send)
        except Exception:
            if not self.refused:  # after a refusal the app fails on the missing body: nothing to report
                raise


def trim_uploads(files: set[str], keep_bytes: int) -> None:
    """Remove the oldest of ``files`` (Gradio's record of uploaded files) until the rest hold ``keep_bytes``."""
    sized = []
    for name in list(files):
        try:
            info = os.stat(name)
        except OSError:
            files.discard(name)
            continue
        sized.append((info.st_ctime, info.st_size, name))
    total = sum(size for _, size, _ in sized)
    for _, size, name in sorted(sized):
        if total <= keep_bytes:
            break
        with contextlib.suppress(OSError):
            os.remove(name)
        files.discard(name)
        total -= size


def too_large(limit: int) -> str:
    return f"the request is larger than the app accepts ({limit >> 20} MB; see --max-upload-mb)"


@dataclass(frozen=True)
class BodyLimits:
    """Largest body in bytes: of any request, of one request to Gradio's upload route, of a vector search, of the
    login form."""

    request: int
    upload_route: int
    vector: int
    login: int = LOGIN_BODY_BYTES

    @classmethod
    def from_upload_limit(cls, max_upload_bytes: int, vector_dim: int) -> BodyLimits:
        return cls(max_upload_bytes + FORM_BYTES, max_upload_bytes * UPLOAD_ROUTE_FILES + FORM_BYTES,
                   vector_body_bytes(vector_dim))

    def of(self, path: str) -> int:
        if LOGIN_ROUTE.search(path):
            return self.login
        if VECTOR_ROUTE.search(path):
            return self.vector
        return self.upload_route if UPLOAD_ROUTE.search(path) else self.request


class AppGuard:
    """ASGI middleware in front of the Gradio app: the body, file and login rules above."""

    def __init__(self, app: Callable, files: FileGuard, throttle: LoginThrottle, limits: BodyLimits) -> None:
        self.app, self.files, self.throttle, self.limits = app, files, throttle, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        send = nosniff_json(send, always=path.startswith(API_PREFIX))
        file_route = FILE_ROUTE.search(path)
        if file_route:
            await self._serve_file(file_route.group("path"), scope, receive, send)
        elif LOGIN_ROUTE.search(path) and scope.get("method") == "POST":
            await self._attempt(scope, receive, send, FAILED_LOGIN, login_verified)
        elif has_basic_credentials(scope):
            await self._attempt(scope, receive, send, FAILED_BASIC, basic_verified(scope))
        else:
            await self._admit(scope, receive, send)

    async def _serve_file(self, requested: str, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.files.allows(requested):
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                    (b"x-content-type-options", b"nosniff")]})
            await send({"type": "http.response.body", "body": b"Not found"})
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start" and message.get("status", 500) < 300:
                message = {**message, "headers": file_headers(list(message.get("headers", [])), requested)}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _needs_login(self, scope: Scope) -> bool:
        """Every API route, every route that takes a body and every request that carries one, except the login
        form."""
        if getattr(scope.get("app"), "auth", None) is None or LOGIN_ROUTE.search(scope.get("path", "")):
            return False
        return (scope.get("path", "").startswith(API_PREFIX) or scope.get("method") not in BODYLESS_METHODS
                or has_body(scope))

    async def _admit(self, scope: Scope, receive: Receive, send: Send,
                     admitted: Callable[[], None] | None = None) -> None:
        """Pass the request on once its login and announced size are checked, its body capped while it streams."""
        if self._needs_login(scope):
            if not logged_in(Request(scope)):
                await refuse(send, 401, "log in first: the app's --auth applies", ((b"www-authenticate", b"Basic"),))
                return
            if admitted is not None:
                admitted()
        limit = self.limits.of(scope.get("path", ""))
        length = content_length(scope)
        if length is not None and length > limit:
            await refuse(send, 413, too_large(limit))
            return
        await BodyCap(limit, receive, send, has_body(scope)).run(self.app, scope)
        if UPLOAD_ROUTE.search(scope.get("path", "")) and hasattr(scope.get("app"), "get_blocks"):
            uploaded = scope["app"].get_blocks().upload_file_set
            await anyio.to_thread.run_sync(trim_uploads, uploaded, self.limits.upload_route * UPLOADS_KEPT_REQUESTS)

    async def _attempt(self, scope: Scope, receive: Receive, send: Send, failures: frozenset[int],
                       verified: Callable[[int], bool]) -> None:
        """A request that carries a password: admitted only while the client has room, failures held back, and
        the count of failures cleared only when ``verified`` says its credentials were right."""
        client = (scope.get("client") or ("unknown",))[0]
        if not self.throttle.enter(client):
            await refuse(send, 429, "too many login attempts at once from this address: wait for their answers")
            return
        in_flight = True

        def leave() -> None:
            nonlocal in_flight
            if in_flight:
                in_flight = False
                self.throttle.leave(client)

        def settle(status: int) -> None:
            if verified(status):
                self.throttle.succeeded(client)
            leave()

        async def send_slowly(message: dict) -> None:
            if message["type"] == "http.response.start" and in_flight:
                status = message.get("status", 500)
                if status in failures:
                    await self.throttle.hold_failure(client)
                    leave()
                else:
                    settle(status)
            await send(message)

        try:
            await self._admit(scope, receive, send_slowly, lambda: settle(200))  # past the login check
        finally:
            leave()

"""The app's front door, as one ASGI middleware: which files may leave the server, and how fast logins may fail.

Files: the app never hands out a dataset path. Thumbnails, detail views, the map and exports are written by
the app and copied by Gradio into its own cache folder, so only that folder is served; a request for anything
else (an ``evil.html`` among the images, the index, the model, the curation store) is answered 404, whatever
the encoding. What is served carries ``X-Content-Type-Options: nosniff``; only raster images are shown
inline, anything else (CSV, zip, JSON) is an attachment, so no served file can run script in the app's origin.

Logins: a failed login from one client is answered only after a delay that doubles with each failure
(capped), and one client's attempts are handled one at a time, so guessing a password takes hours, not
seconds, while a right password still gets in at once. Behind a reverse proxy every user shares the proxy's
address, and so its delay.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

INLINE_TYPES = frozenset({"image/jpeg", "image/png", "image/webp", "image/gif"})
FILE_ROUTE = re.compile(r"(?:/file=|/gradio_api/file/)(?P<path>.*)$")  # Gradio's routes that serve a file path
LOGIN_ROUTE = re.compile(r"/login/?$")
FAILED_LOGIN = frozenset({400, 401, 403})  # the login form's answers to wrong credentials
FAILED_BASIC = frozenset({401})  # a route's answer to wrong HTTP Basic credentials
BASIC_SLOTS = 4  # requests with HTTP Basic credentials one client may have in flight

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

    Login forms are handled one at a time per client, and requests carrying HTTP Basic credentials (the JSON
    API) at most ``BASIC_SLOTS`` at a time, so parallel guesses gain little.
    """

    def __init__(self, first_delay: float = 0.1, max_delay: float = 2.0, forget_after: float = 900.0) -> None:
        self.first_delay, self.max_delay, self.forget_after = first_delay, max_delay, forget_after
        self._failures: dict[str, tuple[int, float]] = {}
        self._gates: dict[tuple[str, int], asyncio.Semaphore] = {}

    def gate(self, client: str, slots: int) -> asyncio.Semaphore:
        return self._gates.setdefault((client, slots), asyncio.Semaphore(slots))

    def failed(self, client: str) -> float:
        """Count a failure; returns how long to hold its answer back."""
        count, last = self._failures.get(client, (0, 0.0))
        now = time.monotonic()
        count = 1 if now - last > self.forget_after else count + 1
        self._failures[client] = (count, now)
        return min(self.first_delay * 2 ** (count - 1), self.max_delay)

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)


def has_basic_credentials(scope: Scope) -> bool:
    return any(key.lower() == b"authorization" and value[:6].lower() == b"basic "
               for key, value in scope.get("headers", []))


class AppGuard:
    """ASGI middleware in front of the Gradio app: the file rules and the login throttle above."""

    def __init__(self, app: Callable, files: FileGuard, throttle: LoginThrottle) -> None:
        self.app, self.files, self.throttle = app, files, throttle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        file_route = FILE_ROUTE.search(path)
        if file_route:
            await self._serve_file(file_route.group("path"), scope, receive, send)
        elif LOGIN_ROUTE.search(path) and scope.get("method") == "POST":
            await self._login(scope, receive, send, slots=1, failures=FAILED_LOGIN)
        elif has_basic_credentials(scope):
            await self._login(scope, receive, send, slots=BASIC_SLOTS, failures=FAILED_BASIC)
        else:
            await self.app(scope, receive, send)

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

    async def _login(self, scope: Scope, receive: Receive, send: Send, slots: int, failures: frozenset[int]) -> None:
        client = (scope.get("client") or ("unknown",))[0]
        async with self.throttle.gate(client, slots):
            async def send_slowly(message: dict) -> None:
                if message["type"] == "http.response.start":
                    if message.get("status") in failures:
                        await asyncio.sleep(self.throttle.failed(client))
                    elif message.get("status", 500) < 300:
                        self.throttle.succeeded(client)
                await send(message)

            await self.app(scope, receive, send_slowly)

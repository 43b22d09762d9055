"""``twist app [--model M --index INDEX]``: the web app to browse, search, curate and export the clusters.

It binds 127.0.0.1 unless told otherwise, serves only files it made itself (re-encoded images, exports; see
app/guard.py), takes logins from a file or $TWIST_AUTH and slows failed ones (per connection address, or per
forwarded address from a --trusted-proxy), refuses strangers' and oversized bodies before reading them, limits
pixels and concurrency, and turns every problem into a sentence (never a traceback).
"""

from __future__ import annotations

import argparse
import atexit
import ipaddress
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from twist_core.commands import run_command
from twist_core.config import AutoConfig, command_parser, option
from twist_core.errors import UserError
from twist_core.stop_signals import StopRequested

if TYPE_CHECKING:
    import gradio as gr
    from starlette.middleware import Middleware

    from app.workspace import Workspace

log = logging.getLogger("twist.app")
DEMO_DIR = Path("models") / "demo"
DEMO_MODEL = "model.onnx"


@dataclass
class AppConfig(AutoConfig):
    model: str | None = option(None, "exported model (.onnx); default: models/demo/model.onnx")
    index: str | None = option(None, "index folder written by twist index; default: models/demo/index")
    host: str = option("127.0.0.1", "address to bind (0.0.0.0 shares the app on the network: use --auth)")
    port: int = option(7860, "port to listen on (0 = any free port)")
    auth: str | None = option(None, "require a login: USER:PASSWORD (shows in ps: prefer --auth-file or "
                                    "$TWIST_AUTH), or a file with one USER:PASSWORD per line")
    auth_file: str | None = option(None, "require a login: a file with one USER:PASSWORD per line")
    state_dir: str | None = option(None, "folder of the curation store, thumbnails and map cache; default: "
                                         "the index folder")
    max_upload_mb: int = option(20, "largest accepted upload in MB")
    max_pixels: int = option(40_000_000, "refuse uploaded or indexed images with more pixels")
    concurrency: int = option(4, "requests of one kind served at once (searches, pages, ...)")
    queue_size: int = option(64, "requests that may wait in the queue before new ones are refused")
    device: str = option("cpu", "where the model and the index run", choices=["auto", "cpu", "cuda"])
    warm_thumbnails: bool = option(True, "make the first page of every cluster's thumbnails in the background")
    trusted_proxy: str | None = option(None, "reverse proxies (addresses or networks, a comma list) whose "
                                             "X-Forwarded-For names the client; from anyone else the header is "
                                             "ignored and the login throttle sees the connection's address",
                                       metavar="ADDR[,ADDR...]")


class AppStartError(UserError):
    """The app cannot start as configured (missing model or index, bad --auth); the message says why."""


def demo_dir() -> Path:
    """The shipped demo model: $TWIST_DEMO_DIR (set in the Docker image), else models/demo of this checkout."""
    return Path(os.environ.get("TWIST_DEMO_DIR") or Path(__file__).resolve().parents[1] / DEMO_DIR)


def resolve_defaults(config: AppConfig, demo: Path | None = None) -> AppConfig:
    """Without --model/--index, open the shipped demo model on the digits (labelled and indexed on first use)."""
    demo = demo or demo_dir()
    if config.model is None:
        if not (demo / DEMO_MODEL).is_file():
            raise AppStartError(f"no --model given and no demo model at {demo / DEMO_MODEL}; build one with "
                                "twist train, twist export, twist label and twist index (or run twist demo)")
        config.model = str(demo / DEMO_MODEL)
    if config.index is None:
        if Path(config.model).resolve() != (demo / DEMO_MODEL).resolve():
            raise AppStartError("--index is needed with --model: build one with twist index LABELS --model MODEL "
                                "--out INDEX")
        from twist_core.demo import prepare_demo_index

        config.index = str(prepare_demo_index(Path(config.model)))
    return config


AUTH_ENV = "TWIST_AUTH"
PS_WARNING = ("--auth USER:PASSWORD leaves the password visible to anyone who can list processes (ps); "
              f"put it in a file for --auth-file PATH or in the {AUTH_ENV} environment variable")


def parse_auth(value: str | None) -> list[tuple[str, str]] | None:
    """``user:password`` or a file of such lines -> Gradio's list of credentials."""
    if not value:
        return None
    lines = read_auth_file(Path(value)) if Path(value).is_file() else [value]
    return credential_pairs(lines, "--auth expects USER:PASSWORD or a file with one USER:PASSWORD per line")


def read_auth_file(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        raise AppStartError(f"--auth-file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise AppStartError(f"--auth-file {path}: cannot read it ({error})") from None


def credential_pairs(lines: list[str], problem: str) -> list[tuple[str, str]]:
    pairs = [tuple(line.strip().split(":", 1)) for line in lines if line.strip() and not line.startswith("#")]
    if not pairs or any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
        raise AppStartError(problem)
    return pairs  # type: ignore[return-value]


def resolve_auth(config: AppConfig) -> list[tuple[str, str]] | None:
    """Credentials from --auth-file, --auth or $TWIST_AUTH (lines of USER:PASSWORD); None: no login."""
    if config.auth_file and config.auth:
        raise AppStartError("give --auth-file or --auth, not both")
    if config.auth_file:
        return credential_pairs(read_auth_file(Path(config.auth_file)),
                                f"--auth-file {config.auth_file} holds no USER:PASSWORD line")
    if config.auth:
        if not Path(config.auth).is_file():
            log.warning(PS_WARNING)
        return parse_auth(config.auth)
    if os.environ.get(AUTH_ENV):
        return credential_pairs(os.environ[AUTH_ENV].splitlines(),
                                f"{AUTH_ENV} expects USER:PASSWORD (one per line)")
    return None


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def build_app(config: AppConfig):
    """The Workspace and its Gradio Blocks with queue limits set; raises AppStartError on a bad setup."""
    config = resolve_defaults(config)
    model, index = Path(config.model), Path(config.index)  # type: ignore[arg-type]
    if not model.is_file():  # checked before the slow imports, so a typo is reported at once
        raise AppStartError(f"no model at {model} (export one with: twist export RUN --out {model})")
    if not (index / "manifest.json").is_file():
        raise AppStartError(f"no index in {index} (build one with: twist index LABELS --model MODEL --out {index})")

    from app.ui import build_ui
    from app.workspace import AppUserError, Workspace

    try:
        state_dir = Path(config.state_dir) if config.state_dir else None
        workspace = Workspace(model, index, state_dir, config.max_pixels, config.device)
    except AppUserError as error:
        raise AppStartError(str(error)) from None
    demo = build_ui(workspace)
    demo.queue(default_concurrency_limit=config.concurrency, max_size=config.queue_size)
    return workspace, demo


def guard_middleware(config: AppConfig, vector_dim: int) -> Middleware:
    """Refuse strangers' and oversized bodies unread, serve files only from Gradio's cache (copies of what the
    app made), throttle failed logins, keep the uploads bounded."""
    from gradio.utils import get_upload_folder
    from starlette.middleware import Middleware

    from app.guard import AppGuard, BodyLimits, FileGuard, LoginThrottle

    return Middleware(AppGuard, files=FileGuard([get_upload_folder()]), throttle=LoginThrottle(),
                      limits=BodyLimits.from_upload_limit(config.max_upload_mb << 20, vector_dim))


UPLOAD_FOLDER_ENV = "GRADIO_TEMP_DIR"  # Gradio's folder of uploads and of the copies of files it serves


def own_upload_folder() -> None:
    """Give Gradio a fresh folder of this app's own (inside $GRADIO_TEMP_DIR or the system's temporary folder),
    removed when the app exits: uploads used to pile up in the shared /tmp/gradio, run after run."""
    folder = Path(tempfile.mkdtemp(prefix="twist-app-", dir=os.environ.get(UPLOAD_FOLDER_ENV) or None))
    os.environ[UPLOAD_FOLDER_ENV] = str(folder)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)


FORWARDED_ENV = "FORWARDED_ALLOW_IPS"  # uvicorn's list of proxies whose X-Forwarded-For it applies


def trusted_proxies(config: AppConfig) -> list[str]:
    """The --trusted-proxy addresses and networks (a comma list), each checked."""
    proxies = [part.strip() for part in str(config.trusted_proxy or "").split(",") if part.strip()]
    for proxy in proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise AppStartError(f"--trusted-proxy {proxy} is not an IP address or network (such as 127.0.0.1 "
                                "or 10.0.0.0/8)") from None
    return proxies


def trust_only(proxies: list[str]) -> None:
    """Make uvicorn read X-Forwarded-For only from ``proxies``: by default it trusts every loopback peer, which
    let any local client pick the address the login throttle sees."""
    os.environ[FORWARDED_ENV] = ",".join(proxies)


def check_options(config: AppConfig) -> None:
    """Numbers out of range are usage errors, reported before anything slow starts."""
    if not 0 <= config.port <= 65535:
        raise AppStartError(f"--port {config.port} is not a port: give 1 to 65535 (or 0 for any free port)")
    for flag, value in (("--max-upload-mb", config.max_upload_mb), ("--max-pixels", config.max_pixels),
                        ("--concurrency", config.concurrency), ("--queue-size", config.queue_size)):
        if value < 1:
            raise AppStartError(f"{flag} {value} must be at least 1")
    if not config.host.strip():
        raise AppStartError("--host must name an address, such as 127.0.0.1 or 0.0.0.0")
    trusted_proxies(config)


def api_routes(workspace, config: AppConfig) -> list:
    """The JSON API's routes (``/api/v1``), handed to the app when it is created so they exist from the start."""
    from app.api import build_router

    return build_router(workspace, config.max_upload_mb << 20, config.concurrency).routes


def launch(config: AppConfig, block: bool = True):
    """Start the server; returns (workspace, demo) when ``block`` is False (tests, benchmarks)."""
    check_options(config)
    trust_only(trusted_proxies(config))
    auth = resolve_auth(config)
    own_upload_folder()
    workspace, demo = build_app(config)
    from app.ui import page_css  # after build_app, which imports the UI (slowly) once the setup is checked

    for warning in workspace.misplaced_outputs():
        log.warning(warning)
    if config.warm_thumbnails:
        workspace.warm_thumbnails()

    middleware = guard_middleware(config, workspace.index.dim)

    def start() -> None:
        demo.launch(server_name=config.host, server_port=config.port or free_port(config.host), auth=auth,
                    css=page_css(), allowed_paths=workspace.output_folders, max_file_size=f"{config.max_upload_mb}mb",
                    show_error=False, prevent_thread_lock=True, inbrowser=False, quiet=not block,
                    app_kwargs={"middleware": [middleware], "routes": api_routes(workspace, config)})

    if not block:
        start()
        return workspace, demo
    serve_until_stopped(start, demo, workspace)
    return workspace, demo


def serve_until_stopped(start: Callable[[], None], demo: gr.Blocks, workspace: Workspace) -> None:
    """Start the server, wait for Ctrl-C or SIGTERM (``docker stop``), then stop it and close the index.

    Both signals are only remembered (``StopRequested``, as training does), from before the server starts: the
    page answers while gradio is still finishing its start-up, and a Ctrl-C raised inside that start-up ended
    the process with a traceback and without closing the index; now it is acted on as soon as the start-up
    returns. SIGTERM used to end the process on the spot.
    """
    with StopRequested().installed() as stop:
        try:
            start()
            while stop.signal_number is None:
                time.sleep(0.2)
            log.info("stopping the app")
        finally:
            demo.close()
            workspace.close()


def build_parser() -> argparse.ArgumentParser:
    return command_parser("twist app", __doc__, AppConfig)


def open_app(config: AppConfig) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("twist.app").setLevel(logging.INFO)
    launch(config)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("twist app", build_parser(), AppConfig, argv, open_app)

if __name__ == "__main__":
    sys.exit(main())

"""Logins on a live ``twist app``: credentials that never show in ``ps``, and password guessing slowed down.

Credentials come from ``--auth-file`` or ``$TWIST_AUTH``; ``--auth USER:PASSWORD`` still works but warns,
since any local user can read a process's command line. A client's failed logins are answered ever later.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import REPO, start_app_server, stop_app_server
from gradio_client import Client

USER, PASSWORD = "ann", "correct horse battery staple"
GUESSES = 30
GUESSING_WINDOW_S = 6.0  # without throttling, 30 wrong logins took 1.2 s


@pytest.fixture(scope="module")
def auth_file_server(app_bundle: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    state = tmp_path_factory.mktemp("auth_state") / "state"
    secrets = state.parent / "users.txt"
    secrets.write_text(f"# one USER:PASSWORD a line\n{USER}:{PASSWORD}\nbob:another one\n")
    process, url = start_app_server(app_bundle, state, "--auth-file", str(secrets))
    try:
        yield {"url": url, "pid": process.pid, "log": state.parent / f"{state.name}-server.log"}
    finally:
        stop_app_server(process)


def login(url: str, user: str, password: str) -> int:
    return httpx.post(url + "login", data={"username": user, "password": password}, timeout=60).status_code


def test_credentials_from_a_file_never_reach_the_command_line(auth_file_server: dict) -> None:
    command_line = Path(f"/proc/{auth_file_server['pid']}/cmdline").read_bytes().decode()
    assert PASSWORD not in command_line
    assert login(auth_file_server["url"], USER, PASSWORD) == 200
    assert login(auth_file_server["url"], "bob", "another one") == 200
    assert httpx.get(auth_file_server["url"] + "config").status_code in (401, 403)
    assert Client(auth_file_server["url"], auth=(USER, PASSWORD), verbose=False).predict("size",
                                                                                       api_name="/overview")
    assert "visible" not in auth_file_server["log"].read_text()


def test_repeated_wrong_logins_are_slowed_while_the_right_one_still_works(auth_file_server: dict) -> None:
    url, start, answered = auth_file_server["url"], time.monotonic(), 0
    while answered < GUESSES and time.monotonic() - start < GUESSING_WINDOW_S:
        assert login(url, USER, f"guess {answered}") == 400
        answered += 1
    assert answered < GUESSES // 2, f"{answered} wrong logins answered in {GUESSING_WINDOW_S} s"
    start = time.monotonic()
    assert login(url, USER, PASSWORD) == 200
    assert time.monotonic() - start < 5.0
    assert login(url, USER, "wrong again") == 400  # a success starts the count afresh: answered at once


def test_wrong_basic_credentials_on_the_json_api_are_slowed_too(auth_file_server: dict) -> None:
    url, start, answered = auth_file_server["url"] + "api/v1/clusters", time.monotonic(), 0
    while answered < GUESSES and time.monotonic() - start < GUESSING_WINDOW_S:
        assert httpx.get(url, auth=(USER, f"guess {answered}"), timeout=60).status_code == 401
        answered += 1
    assert answered < GUESSES // 2, f"{answered} wrong Basic logins answered in {GUESSING_WINDOW_S} s"
    assert httpx.get(url, auth=(USER, PASSWORD), timeout=60).status_code == 200


def test_credentials_from_the_environment(app_bundle: dict[str, Path], tmp_path: Path) -> None:
    process, url = start_app_server(app_bundle, tmp_path / "state", env={"TWIST_AUTH": f"{USER}:{PASSWORD}"})
    try:
        assert PASSWORD not in Path(f"/proc/{process.pid}/cmdline").read_bytes().decode()
        assert login(url, USER, "nope") == 400 and login(url, USER, PASSWORD) == 200
    finally:
        stop_app_server(process)


def test_a_password_on_the_command_line_still_works_but_is_warned_about(app_bundle: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    process, url = start_app_server(app_bundle, tmp_path / "state", "--auth", f"{USER}:{PASSWORD}")
    try:
        assert login(url, USER, PASSWORD) == 200
    finally:
        stop_app_server(process)
    log = (tmp_path / "state-server.log").read_text()
    assert "visible to anyone who can list processes" in log and "--auth-file" in log and "TWIST_AUTH" in log


@pytest.mark.parametrize("args, problem", [
    (["--auth-file", "/nonexistent/users.txt"], "no such file"),
    (["--auth-file", "EMPTY", "--auth", "a:b"], "not both"),
    (["--auth-file", "EMPTY"], "USER:PASSWORD"),
])
def test_bad_credentials_stop_the_start_with_one_line(args: list[str], problem: str, tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("# nobody\n")
    args = [str(tmp_path / "empty.txt") if a == "EMPTY" else a for a in args]
    result = subprocess.run([sys.executable, "-m", "twist_core.cli", "app", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and problem in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("option, value", [("--port", "99999"), ("--port", "-1"), ("--max-upload-mb", "0"),
                                           ("--max-pixels", "0"), ("--concurrency", "0"), ("--queue-size", "-5")])
def test_a_bad_app_option_is_one_line_and_exit_2(option: str, value: str, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "twist_core.cli", "app", option, value], cwd=REPO,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TWIST_DEMO_DIR": str(tmp_path / "no-demo")})
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("twist app: error:") and option in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr

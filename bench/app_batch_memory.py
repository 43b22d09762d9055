"""Peak memory of ``twist app`` while its Batch tab labels a small zip of huge images (issue 16, item 8).

The zip holds eight 6000 x 6000 PNGs of a few hundred KB in all. The app runs with the shipped demo model
(its digits index prepared in a temporary cache); the server's peak RSS is reset through
``/proc/PID/clear_refs`` just before the request, and read (``VmHWM``) after it.

    python -m bench.app_batch_memory --label after    # adds {"after": ...} to bench/results/app_batch_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import REPO

RESULT = REPO / "bench" / "results" / "app_batch_memory.json"


def huge_png_zip(out: Path, images: int = 8, side: int = 6000) -> Path:
    """A zip of ``images`` PNGs of ``side`` x ``side`` pixels (bands of colour: tiny once compressed)."""
    bands = np.repeat(np.linspace(0, 255, side // 100, dtype=np.uint8), 100)[:side]
    picture = np.stack([np.tile(bands, (side, 1))] * 3, axis=-1)
    png = out.with_suffix(".png")
    Image.fromarray(picture).save(png, optimize=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for i in range(images):
            archive.write(png, f"huge/{i}.png")
    png.unlink()
    return out


def memory_kb(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_app(work: Path) -> tuple[subprocess.Popen, str]:
    """``twist app`` with the demo model, as a new user starts it; returns once it answers."""
    port = free_port()
    env = {**os.environ, "XDG_CACHE_HOME": str(work / "cache"), "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONPATH": str(REPO)}
    log = open(work / "app.log", "w")  # noqa: SIM115 (lives as long as the server)
    process = subprocess.Popen([sys.executable, "-m", "twist_core.cli", "app", "--port", str(port),
                                "--state-dir", str(work / "state"), "--no-warm-thumbnails"],
                               cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(1200):
        if process.poll() is not None:
            raise SystemExit(f"twist app exited: {(work / 'app.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return process, url
        except OSError:
            time.sleep(0.5)
    raise SystemExit("twist app did not answer")


def measure() -> dict:
    from gradio_client import Client, handle_file

    with tempfile.TemporaryDirectory(prefix="twist-batch-memory-") as folder:
        work = Path(folder)
        bundle = huge_png_zip(work / "huge.zip")
        process, url = start_app(work)
        try:
            client = Client(url, verbose=False)
            client.predict("size", api_name="/overview")  # the server warmed up as for any user
            before = memory_kb(process.pid)
            Path(f"/proc/{process.pid}/clear_refs").write_text("5")  # peak RSS := current RSS
            start = time.perf_counter()
            try:
                client.predict([handle_file(str(bundle))], api_name="/batch_label")
                outcome = "labelled"
            except Exception as error:  # the request may be refused; its memory still counts
                outcome = f"refused: {str(error)[:200]}"
            seconds = time.perf_counter() - start
            after = memory_kb(process.pid)
        finally:
            process.terminate()
            process.wait(timeout=30)
        return {"zip_bytes": bundle.stat().st_size, "images": 8, "pixels_each": 6000 * 6000,
                "rss_before_mb": round(before["VmRSS"] / 1024, 1), "peak_rss_mb": round(after["VmHWM"] / 1024, 1),
                "peak_rise_mb": round((after["VmHWM"] - before["VmRSS"]) / 1024, 1),
                "seconds": round(seconds, 2), "outcome": outcome}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="name of this measurement in the results (before, after)")
    args = parser.parse_args()
    result = measure()
    print(json.dumps(result, indent=2))
    saved = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    saved[args.label] = {**result, "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                                            capture_output=True, text=True).stdout.strip(),
                         "machine": f"{os.cpu_count()} CPU cores, no GPU"}
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(saved, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Read scalars back from a real TensorBoard server, as a person looking at the run would.

    scalars = read_tensorboard_scalars(out_dir / "tb", ["train/loss", "train/mfu"])
    scalars["train/loss"]  # [(step, value), ...] in step order

Starts `tensorboard --logdir LOGDIR --host 127.0.0.1 --port 0` (the OS picks a free port, read
back from TensorBoard's own "serving at" line), polls its HTTP API until every tag has
appeared, and stops the server. Shared by the report tests and the trainer's integration test.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _wait_for_url(log: Path, proc: subprocess.Popen, deadline: float) -> str:
    while time.monotonic() < deadline:
        match = re.search(r"(http://127\.0\.0\.1:\d+)/", log.read_text(errors="replace"))
        if match:
            return match.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"tensorboard exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"tensorboard did not start:\n{log.read_text()[-2000:]}")


def read_tensorboard_scalars(logdir: str | Path, tags: list[str], timeout: float = 90.0,
                             run: str | None = None) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} for each tag, from the first run (or `run`) that has it."""
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "tensorboard.log"
        with open(log, "w") as log_fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
                 "--port", "0", "--load_fast", "false", "--reload_interval", "1"],
                stdout=log_fh, stderr=subprocess.STDOUT)
        try:
            base = _wait_for_url(log, proc, deadline)
            runs_of, listing = {}, {}
            while time.monotonic() < deadline:
                try:
                    # /data/plugin/scalars/tags: {run: {tag: {displayName, description}}}
                    listing = _get_json(f"{base}/data/plugin/scalars/tags")
                except (urllib.error.URLError, ConnectionError):
                    listing = {}
                runs_of = {tag: [r for r, ts in sorted(listing.items()) if tag in ts and (run is None or r == run)]
                           for tag in tags}
                if all(runs_of.values()):
                    break
                time.sleep(0.5)
            else:
                missing = [t for t, rs in runs_of.items() if not rs]
                raise TimeoutError(f"tags {missing} never appeared under {logdir} (runs: {listing})")
            out = {}
            for tag, runs in runs_of.items():
                query = urllib.parse.urlencode({"run": runs[0], "tag": tag})
                # /data/plugin/scalars/scalars: [[wall_time, step, value], ...]
                rows = _get_json(f"{base}/data/plugin/scalars/scalars?{query}")
                out[tag] = sorted((int(step), float(value)) for _, step, value in rows)
            return out
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

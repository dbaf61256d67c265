"""`kill -9` at random moments during training leaves a loadable, resumable checkpoint."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.embeddings.formats import read_embedding_file
from app.hypernetworks.files import read_hypernetwork_file
from tests.conftest import make_data_dir
from tests.test_training import make_dataset

ROOT = Path(__file__).resolve().parents[1]


def start(data_dir: Path, dataset: Path, steps: int, kind: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "train_worker.py"), str(data_dir), str(dataset), str(steps), kind],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def read_step(path: Path, kind: str) -> int:
    """Loads the file the way the app does (raises if half-written or NaN) and returns its step."""
    if kind == "embedding":
        return read_embedding_file(path).step
    return read_hypernetwork_file(path).step


@pytest.mark.parametrize("kind", ["embedding", "hypernetwork"])
def test_kill_9_at_random_points_never_loses_the_last_checkpoint(tmp_path, model_store, kind):
    data_dir = make_data_dir(tmp_path / "data", model_store)
    dataset = make_dataset(tmp_path / "stars")
    folder = data_dir / ("embeddings" if kind == "embedding" else "models/hypernetworks")
    path = folder / "zqkill.pt"
    rng = random.Random(1234)
    last_step = 0
    for _ in range(3):
        proc = start(data_dir, dataset, 100000, kind)
        while not proc.stdout.readline().startswith("READY"):  # model loaded; training starts now
            assert proc.poll() is None, "worker exited before training"
        deadline = time.time() + 120
        while time.time() < deadline:  # wait for a save past the last one (slow machines too), then some more
            try:
                if read_step(path, kind) > last_step:
                    break
            except Exception:  # not there yet, or being replaced right now
                pass
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.8))  # somewhere inside the stream of per-step saves
        proc.kill()  # SIGKILL: no cleanup runs
        proc.wait(10)
        step = read_step(path, kind)
        assert step >= last_step
        last_step = step
        # A write cut short leaves only a hidden temp file, which the scans ignore.
        assert {p.name for p in folder.iterdir() if not p.name.startswith(".")} <= {"zqkill.pt", "zqkill.optim"}
    assert last_step > 0
    # Resume to a fixed target: it continues from the saved step and finishes cleanly.
    target = last_step + 5
    proc = start(data_dir, dataset, target, kind)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert f"DONE {target} None" in out
    assert read_step(path, kind) == target
    csv_name = "textual_inversion_loss.csv" if kind == "embedding" else "hypernetwork_loss.csv"
    # log/<date>/<name>/: a run that crosses midnight continues in the new day's folder (A1111 does the same).
    rows = sorted((data_dir / "log").rglob(csv_name))[-1].read_text().splitlines()[1:]
    steps = [int(r.split(",")[0]) for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == target  # no duplicate rows after resumes

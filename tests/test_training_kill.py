"""`kill -9` at random moments during training leaves a loadable, resumable checkpoint."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

from app.embeddings.formats import read_embedding_file
from tests.conftest import make_data_dir
from tests.test_training import make_dataset

ROOT = Path(__file__).resolve().parents[1]


def start(data_dir: Path, dataset: Path, steps: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "train_worker.py"), str(data_dir), str(dataset), str(steps)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_kill_9_at_random_points_never_loses_the_last_checkpoint(tmp_path, model_store):
    data_dir = make_data_dir(tmp_path / "data", model_store)
    dataset = make_dataset(tmp_path / "stars")
    path = data_dir / "embeddings" / "zqkill.pt"
    rng = random.Random(1234)
    last_step = 0
    for _ in range(3):
        proc = start(data_dir, dataset, 100000)
        while not proc.stdout.readline().startswith("READY"):  # model loaded; training starts now
            assert proc.poll() is None, "worker exited before training"
        time.sleep(rng.uniform(0.3, 1.5))  # somewhere inside the stream of per-step saves
        proc.kill()  # SIGKILL: no cleanup runs
        proc.wait(10)
        saved = read_embedding_file(path)  # raises if half-written or NaN
        assert saved.step >= last_step
        last_step = saved.step
        # A write cut short leaves only a hidden temp file, which the embedding scan ignores.
        assert {p.name for p in path.parent.iterdir() if not p.name.startswith(".")} <= {"zqkill.pt", "zqkill.optim"}
    assert last_step > 0
    # Resume to a fixed target: it continues from the saved step and finishes cleanly.
    target = last_step + 5
    proc = start(data_dir, dataset, target)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert f"DONE {target} None" in out
    assert read_embedding_file(path).step == target
    rows = next((data_dir / "log").rglob("textual_inversion_loss.csv")).read_text().splitlines()[1:]
    steps = [int(r.split(",")[0]) for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == target  # no duplicate rows after resumes

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


def start(data_dir: Path, dataset: Path, steps: int, kind: str, kill_at: str = "") -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "train_worker.py"),
            str(data_dir),
            str(dataset),
            str(steps),
            kind,
            kill_at,
        ],
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
        names = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
        assert names <= {"zqkill.pt", "zqkill.optim", "zqkill.optim.next"}
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


# -- kill -9 at chosen moments ---------------------------------------------------------------------------------
# Each point kills the worker (SIGKILL, from inside, so the moment is exact) at the n-th time it reaches: a VAE
# encode while the latent cache is built, a UNet forward (mid-step), the publishing rename of the embedding, of its
# optimizer state (`.optim.next` written, and its commit over `.optim`), of a log copy, of a preview, or half-way
# through a loss-log row. Then training again runs to the end: the result must equal an uninterrupted run's, bit
# for bit, and every file under a real name must load.
KILL_STEPS = 6
KILL_KINDS = [
    ("latents", 1, 4),
    ("unet", 1, KILL_STEPS),
    ("rename:*/embeddings/zqkill.pt", 1, KILL_STEPS),
    ("rename:*/embeddings/zqkill.optim.next", 1, KILL_STEPS),
    ("rename:*/embeddings/zqkill.optim", 1, KILL_STEPS),
    ("rename:*/log/*/embeddings/zqkill-*.pt", 1, KILL_STEPS),
    ("rename:*/images/zqkill-*.png", 1, 2),
    ("csv", 1, KILL_STEPS),
]


def kill_points(seed: int = 20261205, count: int = 20) -> list[str]:
    """`count` distinct seeded points, every kind at least once."""
    rng = random.Random(seed)
    points = [f"{kind}:{rng.randint(lo, hi)}" for kind, lo, hi in KILL_KINDS]
    while len(points) < count:
        kind, lo, hi = rng.choice(KILL_KINDS)
        point = f"{kind}:{rng.randint(lo, hi)}"
        if point not in points:
            points.append(point)
    return points


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, model_store):
    base = tmp_path_factory.mktemp("kill-straight")
    data_dir = make_data_dir(base / "data", model_store)
    dataset = make_dataset(base / "stars")
    out, _ = start(data_dir, dataset, KILL_STEPS, "embedding").communicate(timeout=180)
    assert f"DONE {KILL_STEPS} None" in out, out
    return read_embedding_file(data_dir / "embeddings" / "zqkill.pt").vectors, dataset


@pytest.mark.parametrize("point", kill_points())
def test_kill_9_at_a_chosen_point_then_resume_ends_bit_identical(tmp_path, model_store, uninterrupted, point):
    import torch
    from PIL import Image

    straight, dataset = uninterrupted
    data_dir = make_data_dir(tmp_path / "data", model_store)
    proc = start(data_dir, dataset, KILL_STEPS, "embedding", point)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == -9, f"the kill point {point} was never reached:\n{out}"
    # Every file under a real name is whole.
    folder = data_dir / "embeddings"
    assert {p.name for p in folder.iterdir() if not p.name.startswith(".")} <= {
        "zqkill.pt",
        "zqkill.optim",
        "zqkill.optim.next",
    }
    read_embedding_file(folder / "zqkill.pt")
    for optim in folder.glob("zqkill.optim*"):
        torch.load(optim, weights_only=True)
    for copy in (data_dir / "log").rglob("zqkill-*.pt"):
        read_embedding_file(copy)
    for preview in (data_dir / "log").rglob("*.png"):
        with Image.open(preview) as image:
            image.load()
    # Training again finishes the run exactly as if it had never been killed (a kill after the last step's save,
    # at its preview say, leaves nothing to finish).
    if read_embedding_file(folder / "zqkill.pt").step < KILL_STEPS:
        proc = start(data_dir, dataset, KILL_STEPS, "embedding")
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0 and f"DONE {KILL_STEPS} None" in out, out
    assert torch.equal(read_embedding_file(folder / "zqkill.pt").vectors, straight)
    rows = next((data_dir / "log").rglob("textual_inversion_loss.csv")).read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, KILL_STEPS + 1))

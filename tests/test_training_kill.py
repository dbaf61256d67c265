"""`kill -9` at random moments during training leaves a loadable, resumable checkpoint."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.embeddings.formats import read_embedding_file
from app.hypernetworks.files import read_hypernetwork_file
from app.lora.files import read_lora_file
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


@pytest.mark.parametrize("kind", ["embedding", "hypernetwork"])
def test_kill_9_at_random_points_never_loses_the_last_checkpoint(tmp_path, model_store, kind):
    data_dir = make_data_dir(tmp_path / "data", model_store)
    dataset = make_dataset(tmp_path / "stars")
    folder = data_dir / KINDS[kind].folder
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
                if KINDS[kind].step(path) > last_step:
                    break
            except Exception:  # not there yet, or being replaced right now
                pass
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.8))  # somewhere inside the stream of per-step saves
        proc.kill()  # SIGKILL: no cleanup runs
        proc.wait(10)
        step = KINDS[kind].step(path)
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
    assert KINDS[kind].step(path) == target
    # log/<date>/<name>/: a run that crosses midnight continues in the new day's folder (A1111 does the same).
    rows = sorted((data_dir / "log").rglob(KINDS[kind].loss_log))[-1].read_text().splitlines()[1:]
    steps = [int(r.split(",")[0]) for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == target  # no duplicate rows after resumes


# -- kill -9 at chosen moments ---------------------------------------------------------------------------------
# Each point kills the worker (SIGKILL, from inside, so the moment is exact) at the n-th time it reaches: a VAE
# encode while the latent cache is built, a UNet forward (mid-step), the publishing rename of the trained file, of
# its optimizer state (`.optim.next` written, and its commit over `.optim`), of a log copy, of a preview, or half-way
# through a loss-log row. Then training again runs to the end: the result must equal an uninterrupted run's, bit
# for bit, and every file under a real name must load. Embeddings get 20 seeded points; hypernetworks and LoRAs
# (the same engine and save order, other files; a LoRA also with a bundled embedding and max-norm) one point of each
# kind.
KILL_STEPS = 6


@dataclass(frozen=True)
class Kind:
    name: str
    folder: str  # of the trained file, in the data folder
    suffix: str  # of the trained file and its log copies
    loss_log: str
    log_folder: str = ""  # of the copies in the log folder: `<name>s` unless given
    sidecars: tuple[str, ...] = ()  # other files the run writes beside the trained one

    def kill_kinds(self) -> list[tuple[str, int, int]]:
        return [
            ("latents", 1, 4),
            ("unet", 1, KILL_STEPS),
            (f"rename:*/{self.folder}/zqkill{self.suffix}", 1, KILL_STEPS),
            (f"rename:*/{self.folder}/zqkill.optim.next", 1, KILL_STEPS),
            (f"rename:*/{self.folder}/zqkill.optim", 1, KILL_STEPS),
            (f"rename:*/log/*/{self.log_folder or self.name + 's'}/zqkill-*{self.suffix}", 1, KILL_STEPS),
            ("rename:*/images/zqkill-*.png", 1, 2),
            ("csv", 1, KILL_STEPS),
            *((f"rename:*/{self.folder}/{sidecar}", 1, 1) for sidecar in self.sidecars),
        ]

    def step(self, path: Path) -> int:
        """The step the trained file on disk is at (0 before the first save of a new LoRA)."""
        if self.name == "embedding":
            return read_embedding_file(path).step or 0
        if self.name == "hypernetwork":
            return read_hypernetwork_file(path).step or 0
        return int(read_lora_file(path).metadata.get("ss_steps", 0)) if path.exists() else 0

    def tensors(self, path: Path) -> dict[str, torch.Tensor]:
        """The trained tensors, read the way the app reads the file (raises if it is damaged)."""
        if self.name == "embedding":
            return {"vectors": read_embedding_file(path).vectors}
        if self.name == "hypernetwork":
            read_hypernetwork_file(path)
            return dict(flat_tensors(torch.load(path, weights_only=True)))
        read_lora_file(path)
        return load_file(path)


KINDS = {
    "embedding": Kind("embedding", "embeddings", ".pt", "textual_inversion_loss.csv"),
    "hypernetwork": Kind("hypernetwork", "models/hypernetworks", ".pt", "hypernetwork_loss.csv"),
    "lora": Kind("lora", "models/Lora", ".safetensors", "lora_loss.csv"),
    # a LoRA with a bundled embedding (pivotal tuning) and max-norm regularization: the embedding's vectors and
    # the scaled layers are in the file, and the trigger word's NAME.json is written beside it
    "pivotal": Kind("pivotal", "models/Lora", ".safetensors", "lora_loss.csv", "loras", ("zqkill.json",)),
}


def flat_tensors(value, prefix: str = ""):
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from flat_tensors(item, f"{prefix}/{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from flat_tensors(item, f"{prefix}/{i}")


def kill_points(kind: Kind, seed: int = 20261205, count: int = 20) -> list[str]:
    """`count` distinct seeded points, every kind of point at least once."""
    rng = random.Random(seed)
    kinds = kind.kill_kinds()
    points = [f"{point}:{rng.randint(lo, hi)}" for point, lo, hi in kinds]
    while len(points) < count:
        point, lo, hi = rng.choice(kinds)
        chosen = f"{point}:{rng.randint(lo, hi)}"
        if chosen not in points:
            points.append(chosen)
    return points


CASES = [("embedding", point) for point in kill_points(KINDS["embedding"])]
CASES += [(name, point) for name in ("hypernetwork", "lora", "pivotal") for point in kill_points(KINDS[name], count=0)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, model_store):
    """Per kind: the tensors of a run never killed, and the dataset it used."""
    base = tmp_path_factory.mktemp("kill-straight")
    dataset = make_dataset(base / "stars")
    runs = {}

    def run(name: str) -> tuple[dict[str, torch.Tensor], Path]:
        if name not in runs:
            data_dir = make_data_dir(base / name, model_store)
            out, _ = start(data_dir, dataset, KILL_STEPS, name).communicate(timeout=180)
            assert f"DONE {KILL_STEPS} None" in out, out
            kind = KINDS[name]
            runs[name] = kind.tensors(data_dir / kind.folder / f"zqkill{kind.suffix}"), dataset
        return runs[name]

    return run


@pytest.mark.parametrize("name, point", CASES)
def test_kill_9_at_a_chosen_point_then_resume_ends_bit_identical(tmp_path, model_store, uninterrupted, name, point):
    from PIL import Image

    kind = KINDS[name]
    straight, dataset = uninterrupted(name)
    data_dir = make_data_dir(tmp_path / "data", model_store)
    proc = start(data_dir, dataset, KILL_STEPS, name, point)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == -9, f"the kill point {point} was never reached:\n{out}"
    # Every file under a real name is whole.
    folder = data_dir / kind.folder
    trained = folder / f"zqkill{kind.suffix}"
    names = {p.name for p in folder.iterdir() if not p.name.startswith(".")} if folder.is_dir() else set()
    assert names <= {trained.name, "zqkill.optim", "zqkill.optim.next", *kind.sidecars}
    for sidecar in kind.sidecars:  # whole, when there
        if (folder / sidecar).exists():
            json.loads((folder / sidecar).read_text(encoding="utf-8"))
    for optim in folder.glob("zqkill.optim*"):
        torch.load(optim, weights_only=True)
    for copy in (data_dir / "log").rglob(f"zqkill-*{kind.suffix}"):
        kind.tensors(copy)
    for preview in (data_dir / "log").rglob("*.png"):
        with Image.open(preview) as image:
            image.load()
    # Training again finishes the run exactly as if it had never been killed (a kill after the last step's save,
    # at its preview say, leaves nothing to finish; a kill before the first save leaves no file).
    if kind.step(trained) < KILL_STEPS:
        proc = start(data_dir, dataset, KILL_STEPS, name)
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0 and f"DONE {KILL_STEPS} None" in out, out
    result = kind.tensors(trained)
    assert result.keys() == straight.keys()
    assert all(torch.equal(result[key], straight[key]) for key in straight)
    rows = next((data_dir / "log").rglob(kind.loss_log)).read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, KILL_STEPS + 1))

"""Full disks, denied permissions and read-only folders at every save point of a training run: the run stops with a
message naming the folder, the last good files stay (a resume continues from them), no temp file is left behind,
and the app keeps serving.

Faults are injected at the operating-system boundary (the rename that publishes each file, the append of the loss
log), for files matching a pattern, after a number of successful writes: the training code itself runs unchanged.
"""

from __future__ import annotations

import errno
import fnmatch
import os
from pathlib import Path

import pytest
import torch

import app.training.csv_log as csv_log_module
from app.embeddings.formats import read_embedding_file
from app.generation.txt2img import Txt2ImgParams
from app.training.loop import SaveFailed
from tests.test_training import cfg, make_dataset

NAME = "zqfault"
STEPS = 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("fault-stars"))


def fresh(services) -> Path:
    path = services.embeddings.create(NAME, 2, "star", overwrite=True)
    path.with_suffix(".optim").unlink(missing_ok=True)
    return path


def run(services, dataset, steps=STEPS):
    return services.training.train_embedding(
        cfg(NAME, dataset, steps=steps, save_every=2, create_image_every=2, template_filename="subject.txt")
    ).wait()


@pytest.fixture(scope="module")
def straight(services, dataset):
    """The vectors of an uninterrupted run, and the run's log folder."""
    path = fresh(services)
    result = run(services, dataset)
    assert result.error is None
    return read_embedding_file(path).vectors, result.log_dir


class Faults:
    """Make writes to files matching `pattern` fail with `code` after `allowed` successful ones."""

    def __init__(self, monkeypatch, pattern: str, code: int, allowed: int):
        self.pattern, self.code, self.allowed, self.failed = pattern, code, allowed, 0
        real_replace, real_open = os.replace, open

        def replace(src, dst, *args, **kwargs):
            self._check(dst)
            return real_replace(src, dst, *args, **kwargs)

        def append_open(file, mode="r", *args, **kwargs):
            if "a" in mode:
                self._check(file)
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(csv_log_module, "open", append_open, raising=False)

    def _check(self, path) -> None:
        if not fnmatch.fnmatch(Path(path).as_posix(), self.pattern):
            return
        if self.allowed > 0:
            self.allowed -= 1
            return
        self.failed += 1
        raise OSError(self.code, os.strerror(self.code), str(path))


# (what fails, pattern, errno, successful writes before the fault, folder named, step of the main file kept,
# resume is bit-exact). Saves happen at steps 2 and 4 (file, then log copy, then preview); the loss log is
# rewritten once at the start and appended after every step. The optimizer state waits as `.optim.next` until its
# embedding is written, so the kept `.optim` always belongs to the kept embedding and every resume is exact.
POINTS = [
    ("optimizer state", f"*/embeddings/{NAME}.optim.next", errno.ENOSPC, 1, "/embeddings", 2, True),
    ("optimizer state commit", f"*/embeddings/{NAME}.optim", errno.ENOSPC, 1, "/embeddings", 4, True),
    ("embedding file", f"*/embeddings/{NAME}.pt", errno.ENOSPC, 1, "/embeddings", 2, True),
    ("log copy", f"*/log/*/{NAME}/embeddings/{NAME}-*.pt", errno.EACCES, 1, f"/{NAME}/embeddings", 4, True),
    ("preview image", f"*/log/*/{NAME}/images/*.png", errno.EROFS, 1, f"/{NAME}/images", 4, True),
    ("loss log", f"*/log/*/{NAME}/textual_inversion_loss.csv", errno.ENOSPC, 3, f"/{NAME}", 2, True),
]


@pytest.mark.parametrize(
    ("what", "pattern", "code", "allowed", "folder", "kept_step", "exact"), POINTS, ids=[p[0] for p in POINTS]
)
def test_a_failed_save_stops_the_run_keeps_the_last_good_files_and_resume_continues(
    services, dataset, straight, monkeypatch, what, pattern, code, allowed, folder, kept_step, exact
):
    path = fresh(services)
    with monkeypatch.context() as m:
        faults = Faults(m, pattern, code, allowed)
        result = run(services, dataset)
    assert faults.failed == 1, f"the {what} fault never fired"
    assert result.error is not None and result.step < STEPS, result.error
    assert os.strerror(code) in result.error and f"{folder}:" in result.error, result.error
    assert f"step {kept_step})" in result.error, result.error
    kept = read_embedding_file(path)
    assert kept.step == kept_step and torch.isfinite(kept.vectors).all()
    leftovers = list(services.settings.data_dir.rglob(".*.tmp"))
    assert leftovers == []
    # The app keeps serving.
    image = services.txt2img.generate(Txt2ImgParams(prompt="a star", width=64, height=64, steps=2, save_images=False))
    assert image.images
    # Training again continues from the kept files; with the optimizer state that belongs to them, exactly.
    resumed = run(services, dataset)
    assert resumed.error is None and resumed.step == STEPS
    if exact:
        assert torch.equal(read_embedding_file(path).vectors, straight[0])


def test_an_unwritable_log_folder_refuses_to_start_and_changes_nothing(services, dataset, monkeypatch):
    path = fresh(services)
    before = path.read_bytes()
    with monkeypatch.context() as m:
        Faults(m, f"*/log/*/{NAME}/settings.json", errno.EROFS, 0)
        with pytest.raises(SaveFailed, match=r"Training did not start: could not write the log folder in .*zqfault"):
            run(services, dataset)
    assert path.read_bytes() == before and not path.with_suffix(".optim").exists()


def test_over_http_a_full_disk_is_a_message_not_a_server_error(server, tmp_path):
    """The real server, its real disk: the API answers A1111's `info` with our message (no 500), and serves on."""
    import requests

    from tests.test_training_api import payload

    url = f"{server.url}/sdapi/v1"
    dataset = make_dataset(tmp_path / "stars")
    requests.post(f"{url}/create/embedding", json={"name": "apifull"}, timeout=30)
    log_dir = tmp_path / "not-a-folder"
    log_dir.write_text("a file where the log folder should be")  # mkdir fails with a real OSError
    response = requests.post(
        f"{url}/train/embedding", json=payload("apifull", dataset, steps=2, log_directory=str(log_dir)), timeout=120
    )
    assert response.status_code == 200
    info = response.json()["info"]
    assert "Training did not start: could not write the log folder" in info and str(log_dir) in info, info
    assert requests.get(f"{url}/embeddings", timeout=30).json()["loaded"]["apifull"]["step"] in (0, None)

"""The validation loss (kohya's `validation_split`): held-out images are never trained on, the measure is the same
every time (fixed noise, prompts and timesteps), measuring it does not change what is trained, a resumed run logs
and trains exactly as a straight one, and bad settings are refused before anything starts."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import requests
import torch
from PIL import Image

from app.errors import UserError
from app.training.config import LoraNetwork
from app.training.dataset import TrainingImage, epoch_items
from app.training.validation import hold_out, validation_timesteps
from tests.test_lora_training import clean, lora_cfg, tensors
from tests.test_training import cfg, fresh, interrupt_at, make_dataset, vectors


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("val-stars"))


def images(n: int, reg: int = 0) -> list[TrainingImage]:
    blank = Image.new("RGB", (8, 8))
    return [TrainingImage(Path(f"{i}.png"), blank, "x", "[filewords]", is_reg=i >= n) for i in range(n + reg)]


def logged(result) -> list[tuple[int, float]]:
    with open(result.log_dir / "validation_loss.csv", encoding="utf-8") as f:
        return [(int(row["step"]), float(row["validation_loss"])) for row in csv.DictReader(f)]


def test_hold_out_picks_a_share_of_the_training_images_by_seed():
    held = hold_out(images(10, reg=3), 0.2, seed=1)
    chosen = [i for i, im in enumerate(held) if im.is_validation]
    assert len(chosen) == 2 and all(i < 10 for i in chosen)  # never a regularization image
    assert chosen == [i for i, im in enumerate(hold_out(images(10, reg=3), 0.2, seed=1)) if im.is_validation]
    others = {tuple(i for i, im in enumerate(hold_out(images(10), 0.2, seed=s)) if im.is_validation) for s in range(8)}
    assert len(others) > 1  # the seed decides which
    assert sum(im.is_validation for im in hold_out(images(4), 0.01, 0)) == 1  # at least one ...
    assert sum(im.is_validation for im in hold_out(images(4), 0.99, 0)) == 3  # ... and never every image
    assert hold_out(images(4), 0.0, 0) == images(4)
    # held-out images are not in any epoch; regularization images still balance the training ones
    items = epoch_items(held)
    assert not set(items) & set(chosen) and len(items) == 2 * 8


def test_validation_timesteps_are_kohya_s():
    assert validation_timesteps(0, 1000) == [200, 400, 600, 800]
    assert validation_timesteps(100, 900) == [260, 420, 580, 740]
    assert validation_timesteps(500, 501) == [500]  # a one-timestep range: that timestep


def test_the_validation_loss_is_logged_each_epoch_and_is_the_same_measure_every_time(services, dataset):
    fresh(services, "zqval")
    run = cfg("zqval", dataset, steps=9, validation_split=0.25, learn_rate="0")  # nothing learns: a fixed model
    job = services.training.train_embedding(run)
    result = job.wait()
    assert result.error is None and result.step == 9
    # 3 of the 4 images train, so an epoch is 3 steps at batch 1; the measure is taken at each epoch's end
    assert [step for step, _ in result.validation_losses] == [3, 6, 9]
    assert logged(result) == [(s, pytest.approx(v, abs=1e-7)) for s, v in result.validation_losses]
    values = {v for _, v in result.validation_losses}
    assert len(values) == 1 and next(iter(values)) > 0  # the same noise, prompts and timesteps every time
    assert job.progress.extra["validation_history"] == result.validation_losses
    assert "validation loss:" in job.progress.text
    settings = (result.log_dir / "settings.json").read_text()
    assert '"validation_images": 1' in settings and '"images": 3' in settings


def test_measuring_does_not_change_what_is_trained_and_resume_is_exact(services, dataset):
    options = dict(steps=10, validation_split=0.25, validate_every_n_steps=2, learn_rate="0.01")
    path = fresh(services, "zqvalresume")
    straight = services.training.train_embedding(cfg("zqvalresume", dataset, **options)).wait()
    trained = vectors(path)
    assert [s for s, _ in straight.validation_losses] == [2, 4, 6, 8, 10]
    assert len({v for _, v in straight.validation_losses}) > 1  # the embedding learns: the measure moves
    # measured less often, the same training
    fresh(services, "zqvalresume")
    services.training.train_embedding(cfg("zqvalresume", dataset, **{**options, "validate_every_n_steps": 5})).wait()
    assert torch.equal(vectors(path), trained)
    # interrupted and continued: the same file, and the log reads as the straight run's
    fresh(services, "zqvalresume")
    first = interrupt_at(services, services.training.train_embedding(cfg("zqvalresume", dataset, **options)), 3)
    assert first.interrupted
    second = services.training.train_embedding(cfg("zqvalresume", dataset, **options)).wait()
    assert torch.equal(vectors(path), trained)
    assert logged(second) == [(s, pytest.approx(v, abs=1e-7)) for s, v in straight.validation_losses]


def test_a_lora_records_its_validation_settings_as_kohya_does(services, dataset):
    clean(services, "zqvallora")
    run = lora_cfg("zqvallora", dataset, steps=4, validation_split=0.5, validation_seed=11, validate_every_n_steps=2)
    result = services.training.train_lora(run, LoraNetwork(rank=2, alpha=2.0, network_dropout=0.5)).wait()
    assert result.error is None and [s for s, _ in result.validation_losses] == [2, 4]
    _, meta = tensors(result.path)
    assert (meta["ss_validation_split"], meta["ss_validation_seed"], meta["ss_validate_every_n_steps"]) == (
        "0.5",
        "11",
        "2",
    )
    assert meta["ss_num_train_images"] == "2"  # the held-out half is not counted as trained
    clean(services, "zqvallora")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("validation_split", 1.0, "Validation split must be between 0 and 1"),
        ("validation_split", -0.1, "Validation split must be between 0 and 1"),
        ("validate_every_n_steps", -1, "Validate every N steps must be between 0 and"),
        ("validation_seed", -5, "Validation seed must be between 0 and 4294967295 \\(or empty: the run's seed\\)"),
    ],
)
def test_bad_validation_settings_are_refused(services, dataset, field, value, message):
    fresh(services, "zqvalbad")
    with pytest.raises(UserError, match=message) as caught:
        services.training.train_embedding(cfg("zqvalbad", dataset, **{field: value}))
    assert caught.value.field == field


def test_one_image_cannot_be_split(services, tmp_path):
    fresh(services, "zqvalone")
    with pytest.raises(UserError, match="A validation loss needs at least 2 training images") as caught:
        services.training.train_embedding(cfg("zqvalone", make_dataset(tmp_path / "one", n=1), validation_split=0.5))
    assert caught.value.field == "validation_split"


def test_validation_through_the_api(server, dataset):
    api = server.url + "/sdapi/v1"
    body = dict(data_root=str(dataset), steps=4, training_width=64, training_height=64, create_image_every=0)
    body.update(lora_name="zqapival", rank=2, alpha=2, learn_rate="0.001", template_filename="hypernetwork.txt")
    body.update(validation_split=0.25, validate_every_n_steps=2)
    answer = requests.post(api + "/train/lora", json=body, timeout=300)
    assert answer.status_code == 200 and answer.json()["info"].endswith("error: None"), answer.text
    path = answer.json()["info"].split("filename: ")[1].split(" error: ")[0]
    assert tensors(path)[1]["ss_validation_split"] == "0.25"
    logs = list((server.data_dir / "log").glob("*/zqapival/validation_loss.csv"))
    assert len(logs) == 1 and len(logs[0].read_text().splitlines()) == 3  # the header and steps 2, 4
    bad = requests.post(api + "/train/lora", json={**body, "validation_split": 1.5}, timeout=30)
    assert bad.status_code == 400 and bad.json()["field"] == "validation_split"


def test_the_measure_runs_the_network_without_dropout(services, dataset):
    """A hypernetwork with dropout at learning rate 0: dropout in the measure would move it from one time to the
    next; evaluation mode keeps it fixed."""
    services.hypernetworks.create(
        "zqvaldrop", [64, 32], "1, 2, 1", "relu", use_dropout=True, dropout_structure="0, 0.5, 0", overwrite=True
    )
    run = cfg("zqvaldrop", dataset, steps=6, validation_split=0.25, validate_every_n_steps=2, learn_rate="0")
    run.template_filename = "hypernetwork.txt"
    result = services.training.train_hypernetwork(run).wait()
    assert result.error is None and len(result.validation_losses) == 3
    assert len({v for _, v in result.validation_losses}) == 1
    (services.settings.hypernetwork_dir / "zqvaldrop.pt").unlink(missing_ok=True)
    (services.settings.hypernetwork_dir / "zqvaldrop.optim").unlink(missing_ok=True)

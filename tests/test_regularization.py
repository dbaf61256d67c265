"""Regularization images (kohya's `reg_data_dir` and `prior_loss_weight`, DreamBooth's prior preservation) on the
real tiny model: each epoch holds as many regularization samples as training samples, a regularization sample is
prompted with its class caption alone and its loss counts `prior_loss_weight`, a LoRA records them as kohya does,
and a run with them resumes bit for bit."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import requests
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, ImageDraw
from safetensors import safe_open

from app.errors import UserError
from app.training.config import LoraNetwork
from app.training.dataset import epoch_items, load_dataset, prompt_for
from app.training.loop import sample_indices
from tests.test_lora_training import clean, lora_cfg, tensors
from tests.test_training import cfg, fresh, interrupt_at, make_dataset


def make_reg_dataset(folder, n=2, caption="zqdog"):
    """kohya's layout for regularization images: `<repeats>_<class>/`, the class being each image's caption."""
    sub = folder / f"1_{caption}"
    sub.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (64, 64), (30, 60 + 40 * i, 200))
        ImageDraw.Draw(im).ellipse((12, 12, 52, 52), fill=(240, 240, 240))
        im.save(sub / f"{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("reg-stars"), n=3)


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    return make_reg_dataset(tmp_path_factory.mktemp("reg-class"))


images_strategy = st.lists(st.tuples(st.integers(1, 5), st.booleans()), max_size=12)


@given(images_strategy)
def test_an_epoch_holds_as_many_regularization_samples_as_training_samples(spec):
    images = [SimpleNamespace(repeats=r, is_reg=is_reg, is_validation=False) for r, is_reg in spec]
    items = epoch_items(images)
    train = [i for i, im in enumerate(images) if not im.is_reg for _ in range(im.repeats)]
    pool = [i for i, im in enumerate(images) if im.is_reg for _ in range(im.repeats)]
    assert items[: len(train)] == train  # the training samples are those of a run without regularization images
    regs = items[len(train) :]
    if not pool:
        assert regs == []
        return
    assert len(regs) == len(train) and all(images[i].is_reg for i in regs)
    if len(pool) <= len(train):  # fewer: every one is used, with its repeats, and cycled
        assert all(regs.count(i) >= pool.count(i) for i in set(pool))
    else:  # more: the first ones, in order (kohya says some are not used)
        assert regs == pool[: len(train)]


def test_a_regularization_image_is_prompted_with_its_class_caption_alone(tmp_path, dataset):
    reg_root = make_reg_dataset(tmp_path / "reg")
    regs, problems = load_dataset(reg_root, 64, 64, [], seed=0, regularization=True)
    assert not problems and [im.filewords for im in regs] == ["zqdog", "zqdog"] and all(im.is_reg for im in regs)
    templates = ["a photo of [name], [filewords]"]
    (train,) = load_dataset(dataset, 64, 64, templates, seed=0)[0][:1]
    for shuffle, drop in ((False, 0.0), (True, 0.0), (True, 0.5)):
        rng = random.Random(1)
        assert prompt_for(regs[0], "zqname", templates, rng, shuffle, drop) in ("zqdog", "")
        assert "zqname" in prompt_for(train, "zqname", templates, random.Random(1), shuffle, drop)
    with pytest.raises(UserError, match=r"Regularization image directory .* does not exist"):
        load_dataset(tmp_path / "missing", 64, 64, [], seed=0, regularization=True)


def first_pick_is(seed: int, index: int, items: list[int]) -> bool:
    return sample_indices(items, seed, 0, 1)[0][0] == index


def step_one(services, dataset, reg, seed, prior_loss_weight):
    """The logged loss and the prompt (its tokens, decoded) of a one-step LoRA run from scratch."""
    clean(services, "zqprior")
    model = services.models.get()
    prompts = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        prompts.append(model.pipe.tokenizer.decode(ids[0], skip_special_tokens=True))

    handle = model.pipe.text_encoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run = lora_cfg(
            "zqprior",
            dataset,
            steps=1,
            seed=seed,
            reg_data_dir=str(reg),
            prior_loss_weight=prior_loss_weight,
            template_filename="subject_filewords.txt",
        )
        result = services.training.train_lora(run, LoraNetwork(rank=4, alpha=4.0)).wait()
    finally:
        handle.remove()
    assert result.error is None, result.error
    return result.losses[0][1], prompts[0]


def test_a_regularization_sample_s_loss_counts_the_prior_loss_weight(services, dataset, reg):
    items = [0, 1, 2, 3, 4, 3]  # 3 training images, then 3 regularization samples from the 2 images (3 and 4)
    reg_seed = next(s for s in range(50) if first_pick_is(s, 3, items))
    train_seed = next(s for s in range(50) if first_pick_is(s, 0, items))
    plain, prompt = step_one(services, dataset, reg, reg_seed, 1.0)
    weighted, prompt_again = step_one(services, dataset, reg, reg_seed, 0.25)
    assert prompt == prompt_again == "zqdog"  # the class caption alone: no trained name, no template
    assert weighted == pytest.approx(plain * 0.25, rel=1e-5)
    plain, prompt = step_one(services, dataset, reg, train_seed, 1.0)
    weighted, _ = step_one(services, dataset, reg, train_seed, 0.25)
    assert "zqprior" in prompt and "star" in prompt  # a training sample: the template with the name
    assert weighted == plain  # a training sample's loss is not weighted


def test_a_lora_with_regularization_images_records_them_and_resumes_exactly(services, dataset, reg):
    run = dict(steps=6, batch_size=2, reg_data_dir=str(reg), prior_loss_weight=0.5)
    clean(services, "zqreglora")
    result = services.training.train_lora(lora_cfg("zqreglora", dataset, **run), LoraNetwork(rank=4, alpha=4.0)).wait()
    assert result.error is None
    straight, meta = tensors(result.path)
    assert meta["ss_num_train_images"] == "3" and meta["ss_num_reg_images"] == "2"
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_zqdog": {"n_repeats": 1, "img_count": 2}}
    assert meta["ss_prior_loss_weight"] == "0.5"
    settings = json.loads((result.log_dir / "settings.json").read_text(encoding="utf-8"))
    assert (settings["images"], settings["regularization_images"], settings["reg_data_dir"]) == (3, 2, str(reg))

    clean(services, "zqreglora")
    first = interrupt_at(
        services, services.training.train_lora(lora_cfg("zqreglora", dataset, **run), LoraNetwork(rank=4, alpha=4.0)), 2
    )
    assert first.interrupted and first.step < 6
    assert (
        services.training.train_lora(lora_cfg("zqreglora", dataset, **run), LoraNetwork(rank=4, alpha=4.0)).wait().step
        == 6
    )
    resumed, _ = tensors(result.path)
    assert all(torch.equal(resumed[k], v) for k, v in straight.items())

    clean(services, "zqreglora")
    services.training.train_lora(
        lora_cfg("zqreglora", dataset, steps=6, batch_size=2), LoraNetwork(rank=4, alpha=4.0)
    ).wait()
    without, meta = tensors(result.path)
    assert meta["ss_num_reg_images"] == "0" and "ss_reg_dataset_dirs" not in meta
    assert any(not torch.equal(without[k], v) for k, v in straight.items())  # they changed what was learned


def test_a_hypernetwork_trains_with_regularization_images(services, dataset, reg):
    services.hypernetworks.create("zqreghn", [64, 32], "1, 2, 1", "relu", "XavierNormal", overwrite=True)
    run = cfg("zqreghn", dataset, steps=3, learn_rate="0.0001", template_filename="hypernetwork.txt")
    run.reg_data_dir, run.batch_size = str(reg), 2
    result = services.training.train_hypernetwork(run).wait()
    assert result.error is None and result.step == 3


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        (dict(prior_loss_weight=0.0), "prior_loss_weight", "Prior loss weight must be above 0 and at most 100"),
        (dict(prior_loss_weight=float("nan")), "prior_loss_weight", "Prior loss weight must be above 0"),
        (dict(prior_loss_weight=101.0), "prior_loss_weight", "at most 100"),
        (dict(reg_data_dir="SAME"), "reg_data_dir", "is the dataset directory"),
        (dict(reg_data_dir="MISSING"), None, "Regularization image directory .* does not exist"),
        (dict(reg_data_dir="zq\x00reg"), None, "Regularization image directory .* is not a usable folder path"),
        (dict(data_root="zq\x00data"), None, "Dataset directory .* is not a usable folder path"),
    ],
)
def test_bad_regularization_settings_are_refused_before_anything_starts(
    services, dataset, tmp_path, change, field, message
):
    paths = {"SAME": str(dataset), "MISSING": str(tmp_path / "missing")}
    change = {k: paths.get(v, v) if isinstance(v, str) else v for k, v in change.items()}
    clean(services, "zqregbad")
    with pytest.raises(UserError, match=message) as caught:
        services.training.train_lora(lora_cfg("zqregbad", dataset, **change), LoraNetwork(rank=4, alpha=4.0))
    assert caught.value.field == field
    assert not (services.settings.lora_dir / "zqregbad.safetensors").exists()


def test_an_embedding_refuses_regularization_images_and_says_why(services, dataset, reg):
    path = fresh(services, "zqregemb")
    before = path.read_bytes()
    with pytest.raises(UserError, match="cannot change an embedding: their prompts are their class captions") as e:
        services.training.train_embedding(cfg("zqregemb", dataset, reg_data_dir=str(reg)))
    assert e.value.field == "reg_data_dir" and path.read_bytes() == before


def test_regularization_images_through_the_api(server, dataset, reg):
    api = server.url + "/sdapi/v1"
    body = dict(data_root=str(dataset), steps=2, training_width=64, training_height=64, create_image_every=0)
    body.update(reg_data_dir=str(reg), prior_loss_weight=0.75)
    answer = requests.post(
        api + "/train/lora", json={**body, "lora_name": "zqapireg", "rank": 2, "alpha": 2}, timeout=300
    )
    assert answer.status_code == 200 and answer.json()["info"].endswith("error: None"), answer.text
    path = answer.json()["info"].split("filename: ")[1].split(" error: ")[0]
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert (meta["ss_num_reg_images"], meta["ss_prior_loss_weight"]) == ("2", "0.75")
    assert requests.post(api + "/create/embedding", json={"name": "zqapiregemb"}, timeout=30).ok
    refused = requests.post(api + "/train/embedding", json={**body, "embedding_name": "zqapiregemb"}, timeout=30)
    assert refused.status_code == 400 and refused.json()["field"] == "reg_data_dir"
    bad = requests.post(
        api + "/train/embedding",
        json={**body, "embedding_name": "zqapiregemb", "reg_data_dir": "", "data_root": "a\0b"},
        timeout=30,
    )
    assert bad.status_code == 400 and "not a usable folder path" in bad.json()["detail"]

"""Aspect-ratio buckets: the bucket sizes, which image goes where, the batches of an epoch, and real training runs
with them on the tiny model (resume bit for bit, SDXL's size conditioning, LoRA metadata)."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw
from safetensors import safe_open

from app.errors import UserError
from app.training.buckets import BucketSchedule, bucket_sizes, bucket_step, epoch_batches, nearest_bucket
from app.training.config import LoraNetwork
from app.training.dataset import load_dataset
from app.training.loop import sample_indices
from tests.test_training import cfg, fresh, interrupt_at, vectors


@pytest.mark.parametrize(("width", "height"), [(512, 512), (1024, 1024), (768, 512), (64, 64), (128, 96)])
def test_buckets_keep_the_area_and_the_step_and_cover_both_orientations(width, height):
    step, area = bucket_step(width, height), width * height
    sizes = bucket_sizes(width, height)
    assert (width, height) in sizes
    for w, h in sizes:
        assert w % step == 0 and h % step == 0
        assert (w, h) == (width, height) or w * h <= area
        assert (h, w) in sizes or (w, h) == (width, height)
    if width == height == 512:  # kohya's 512 px buckets: 64 px steps, 256 to 1024
        assert step == 64 and (512, 512) in sizes and (384, 640) in sizes and (640, 384) in sizes
        assert min(min(s) for s in sizes) == 256 and max(max(s) for s in sizes) == 1024
        assert all(w * h >= 0.75 * area for w, h in sizes)  # none much smaller than the training size
    if width == height == 64:  # the tiny shapes models: 8 px steps
        assert step == 8 and (48, 80) in sizes and (80, 48) in sizes


@settings(max_examples=200, deadline=None)
@given(st.integers(16, 4000), st.integers(16, 4000))
def test_an_image_goes_to_the_bucket_nearest_its_shape(w, h):
    sizes = bucket_sizes(512, 512)
    bw, bh = nearest_bucket((w, h), sizes)
    assert bw == bh or (bw > bh) == (w > h)  # a wide image never goes to a tall bucket, nor the reverse
    error = abs(math.log(bw / bh) - math.log(w / h))
    assert all(error <= abs(math.log(a / b) - math.log(w / h)) + 1e-12 for a, b in sizes)


def test_an_epoch_uses_every_image_once_in_batches_of_one_size():
    sizes = [(64, 64)] * 5 + [(48, 80)] * 3 + [(80, 48)] * 1
    batches = epoch_batches(sizes, 2, seed=7, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(9))
    assert all(len({sizes[i] for i in b}) == 1 and 1 <= len(b) <= 2 for b in batches)
    assert len(batches) == 3 + 2 + 1  # each size's last batch may be smaller
    assert epoch_batches(sizes, 2, seed=7, epoch=0) == batches  # (seed, epoch) decides
    assert epoch_batches(sizes, 2, seed=7, epoch=1) != batches or epoch_batches(sizes, 2, 8, 0) != batches
    schedule = BucketSchedule(sizes, 2, seed=7, per_step=2)  # gradient accumulation: 2 batches a step
    steps = [schedule.micro_batches(s) for s in range(6)]
    assert all(len(step) == 2 for step in steps)
    taken = Counter((i, epoch) for step in steps for batch in step for i, epoch in batch)
    assert set(taken.values()) == {1} and {e for _, e in taken} == {0, 1}  # 12 batches = two whole epochs
    assert schedule.steps_per_epoch == 3


def make_shaped_dataset(folder, shapes=((96, 64), (64, 96), (64, 64), (120, 60), (64, 64), (96, 64))):
    """Stars on pictures of several shapes: wide, tall and square."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(shapes):
        im = Image.new("RGB", (w, h), (40 * i, 200, 90))
        ImageDraw.Draw(im).regular_polygon((w // 2, h // 2, min(w, h) // 3), 5, fill=(250, 220, 0))
        im.save(folder / f"{i:02d}-a yellow star.png")
    return folder


@pytest.fixture(scope="module")
def shaped(tmp_path_factory):
    return make_shaped_dataset(tmp_path_factory.mktemp("shaped"))


def test_the_dataset_crops_each_image_to_its_bucket(shaped):
    images, problems = load_dataset(shaped, 64, 64, ["a [name] [filewords]"], 0, bucketing=True)
    assert not problems
    by_name = {im.path.name[:2]: im for im in images}
    assert by_name["00"].image.size == (80, 48) and by_name["01"].image.size == (48, 80)  # 3:2 -> 5:3
    assert by_name["02"].image.size == (64, 64)
    assert by_name["03"].image.size[0] > 2 * by_name["03"].image.size[1] - 40  # 2:1 stays wide
    # SDXL's size conditioning: the file's (h, w), the crop taken from it (the 5:3 bucket is wider than 3:2, so a
    # little of the top and bottom goes: 3 px in the bucket's pixels), and the bucket as the target
    assert by_name["00"].time_ids() == [64.0, 96.0, 3.0, 0.0, 48.0, 80.0]
    square, _ = load_dataset(shaped, 64, 64, ["a [name] [filewords]"], 0)
    assert {im.image.size for im in square} == {(64, 64)}


def test_bucketed_training_resumes_bit_for_bit_and_batches_one_size(services, shaped):
    path = fresh(services, "zqbucket")
    run = dict(steps=10, batch_size=2, enable_bucket=True)
    straight_result = services.training.train_embedding(cfg("zqbucket", shaped, **run)).wait()
    assert straight_result.error is None and straight_result.step == 10
    straight = vectors(path)

    fresh(services, "zqbucket")
    first = interrupt_at(services, services.training.train_embedding(cfg("zqbucket", shaped, **run)), 3)
    assert first.interrupted and 3 <= first.step < 10
    second = services.training.train_embedding(cfg("zqbucket", shaped, **run)).wait()
    assert second.step == 10
    assert torch.equal(vectors(path), straight)
    # not the same as training on square crops
    fresh(services, "zqbucket")
    services.training.train_embedding(cfg("zqbucket", shaped, steps=10, batch_size=2)).wait()
    assert not torch.equal(vectors(path), straight)


def test_bucketing_with_do_not_resize_is_refused(services, shaped):
    fresh(services, "zqbucketbad")
    with pytest.raises(UserError, match="Choose one of 'Do not resize images' and 'Bucket images") as caught:
        services.training.train_embedding(cfg("zqbucketbad", shaped, varsize=True, enable_bucket=True))
    assert caught.value.field == "enable_bucket"


def test_a_bucketed_lora_records_its_buckets_as_kohya_does(services, shaped):
    job = services.training.train_lora(
        cfg("zqbucketlora", shaped, steps=2, batch_size=2, enable_bucket=True, template_filename="hypernetwork.txt"),
        LoraNetwork(rank=4, alpha=4.0),
    )
    result = job.wait()
    assert result.error is None
    with safe_open(str(result.path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_enable_bucket"] == "True"
    assert meta["ss_min_snr_gamma"] == meta["ss_noise_offset"] == "None"  # off, written as kohya does
    assert meta["ss_multires_noise_iterations"] == meta["ss_ip_noise_gamma"] == "None"
    assert meta["ss_multires_noise_discount"] == "0.3"
    assert (meta["ss_loss_type"], meta["ss_huber_schedule"], meta["ss_huber_c"]) == ("l2", "snr", "0.1")
    assert (meta["ss_huber_scale"], meta["ss_debiased_estimation"]) == ("1.0", "False")
    buckets = json.loads(meta["ss_bucket_info"])["buckets"]
    images, _ = load_dataset(shaped, 64, 64, ["[filewords]"], 0, bucketing=True)
    expected = Counter(im.image.size for im in images)
    assert {tuple(b["resolution"]): b["count"] for b in buckets.values()} == expected
    assert len(expected) >= 3


def test_repeats_count_in_every_epoch_with_and_without_buckets():
    items = [0, 0, 0, 1]  # image 0 from a "3_" folder, image 1 once
    picks = [p for step in range(8) for p in sample_indices(items, 5, step, 1)]
    assert Counter(picks) == {(0, 0): 3, (1, 0): 1, (0, 1): 3, (1, 1): 1}
    # without repeats the draw is the one before repeats existed: each epoch a seeded permutation of the images
    order = torch.randperm(4, generator=torch.Generator().manual_seed(5 * 100_003 + 1))
    assert sample_indices(list(range(4)), 5, 2, 2) == [(int(i), 1) for i in order[:2]]


def test_a_kohya_dataset_trains_with_repeats_resumes_exactly_and_is_recorded(services, tmp_path):
    root = tmp_path / "kohya"
    make_shaped_dataset(root / "4_zqstar", shapes=((96, 64), (64, 64)))
    make_shaped_dataset(root / "1_zqstar", shapes=((64, 96),))
    run = dict(steps=6, batch_size=2, enable_bucket=True, template_filename="hypernetwork.txt")
    result = services.training.train_lora(cfg("zqkohya", root, **run), LoraNetwork(rank=4, alpha=4.0)).wait()
    assert result.error is None
    with safe_open(str(result.path), "pt") as f:
        meta = f.metadata()
        straight = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    assert json.loads(meta["ss_dataset_dirs"]) == {
        "4_zqstar": {"n_repeats": 4, "img_count": 2},
        "1_zqstar": {"n_repeats": 1, "img_count": 1},
    }
    assert meta["ss_num_train_images"] == "9"
    buckets = {tuple(b["resolution"]): b["count"] for b in json.loads(meta["ss_bucket_info"])["buckets"].values()}
    assert buckets == {(80, 48): 4, (64, 64): 4, (48, 80): 1}  # per epoch, repeats counted as kohya counts them
    # the same run, interrupted and trained again, ends on the same weights
    result.path.unlink()
    result.path.with_suffix(".optim").unlink(missing_ok=True)
    assert interrupt_at(
        services, services.training.train_lora(cfg("zqkohya", root, **run), LoraNetwork(rank=4, alpha=4.0)), 2
    ).interrupted
    assert services.training.train_lora(cfg("zqkohya", root, **run), LoraNetwork(rank=4, alpha=4.0)).wait().step == 6
    with safe_open(str(result.path), "pt") as f:
        assert all(torch.equal(f.get_tensor(k), v) for k, v in straight.items())

"""kohya's `scale_weight_norms` (max-norm regularization) for LoRA, LoHa and LoKr training: after every step, no
layer's update (as the file applies it) has a norm above the limit; the limit really binds; a resumed run ends on
the same file; bad values are refused before anything starts."""

from __future__ import annotations

import re

import pytest
import torch

from app.errors import UserError
from app.lora.files import read_lora_file
from tests.test_lora_training import clean, dataset, lora_cfg, tensors  # noqa: F401 - `dataset` is a fixture


def update_norms(path) -> dict[str, float]:
    """Each layer's update norm as a reader applies the file (alpha / rank included)."""
    return {name: float(layer.delta(torch.device("cpu")).norm()) for name, layer in read_lora_file(path).layers.items()}


@pytest.mark.parametrize("network_type", ["lora", "loha", "lokr"])
def test_every_layers_update_stays_under_the_limit_and_resume_is_exact(services, dataset, network_type):  # noqa: F811
    name = f"zqmaxnorm{network_type}"
    run = dict(steps=4, seed=2, learn_rate="0.02", save_precision="fp32")
    clean(services, name)
    free = services.training.train_lora(lora_cfg(name, dataset, **run), 4, 4.0, network_type=network_type).wait()
    assert free.error is None
    unlimited = update_norms(free.path)
    limit = 0.3 * max(unlimited.values())  # below what the largest layers reach without it

    clean(services, name)
    job = services.training.train_lora(
        lora_cfg(name, dataset, **run), 4, 4.0, network_type=network_type, scale_weight_norms=limit
    )
    result = job.wait()
    assert result.error is None and result.step == 4
    limited = update_norms(result.path)
    assert max(limited.values()) <= limit * (1 + 1e-5)
    assert sum(abs(n - limit) < 1e-4 * limit for n in limited.values()) >= 1  # held at the limit, not just under
    assert sum(n > limit for n in unlimited.values()) >= 1
    scaled = re.search(r"keys scaled: (\d+), average key norm: ([\d.]+)", job.progress.text)
    assert scaled and int(scaled.group(1)) >= 1, job.progress.text
    assert abs(float(scaled.group(2)) - sum(limited.values()) / len(limited)) < 1e-3
    data, meta = tensors(result.path)
    assert meta["ss_scale_weight_norms"] == str(limit)

    # interrupted after 2 steps and continued: the same file, bit for bit
    clean(services, name)
    first = services.training.train_lora(
        lora_cfg(name, dataset, **{**run, "steps": 2}), 4, 4.0, network_type=network_type, scale_weight_norms=limit
    )
    assert first.wait().step == 2
    again = services.training.train_lora(lora_cfg(name, dataset, **run), 4, 4.0, scale_weight_norms=limit).wait()
    assert again.step == 4
    resumed, _ = tensors(again.path)
    assert resumed.keys() == data.keys() and all(torch.equal(resumed[k], data[k]) for k in data)
    clean(services, name)


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), 5000, "x"])
def test_bad_scale_weight_norms_are_refused_before_anything_starts(services, dataset, value):  # noqa: F811
    with pytest.raises(UserError, match="Scale weight norms") as caught:
        services.training.train_lora(lora_cfg("zqbadnorm", dataset), 4, 4.0, scale_weight_norms=value)
    assert caught.value.field in ("scale_weight_norms", None)
    assert not (services.settings.lora_dir / "zqbadnorm.safetensors").exists()


def test_off_by_default_and_off_is_written_as_kohya_writes_it(services, dataset):  # noqa: F811
    clean(services, "zqnonorm")
    job = services.training.train_lora(lora_cfg("zqnonorm", dataset, steps=1), 4, 4.0)
    result = job.wait()
    assert result.error is None and "keys scaled" not in job.progress.text
    assert tensors(result.path)[1]["ss_scale_weight_norms"] == "None"
    clean(services, "zqnonorm")
